"""Word lists for the caption parser: colours, garments and accessories, and the words between them.

All entries are lower case. Hyphenated words are split at the hyphen before lookup, so
"t-shirt", "light-gray" and "black-and-white" are covered by their parts.
"""

from __future__ import annotations

# The 12 SynthPedes colour names: the default replacement palette and the families every
# colour word maps to, so that "navy" is never "changed" into "blue".
PALETTE = ("black", "white", "gray", "red", "pink", "orange", "yellow", "green", "blue", "purple", "brown", "beige")

COLOR_FAMILY = {
    **{name: name for name in PALETTE},
    "grey": "gray", "silver": "gray", "charcoal": "gray", "silvery": "gray",
    "greyish": "gray", "grayish": "gray",
    "ivory": "white", "cream": "white",
    "maroon": "red", "burgundy": "red", "crimson": "red", "scarlet": "red", "reddish": "red",
    "magenta": "pink", "fuchsia": "pink", "peach": "pink", "salmon": "pink", "coral": "pink", "pinkish": "pink",
    "orangish": "orange", "orangey": "orange", "rust": "orange",
    "gold": "yellow", "golden": "yellow", "mustard": "yellow", "yellowish": "yellow",
    "olive": "green", "lime": "green", "mint": "green", "greenish": "green",
    "navy": "blue", "teal": "blue", "turquoise": "blue", "aqua": "blue", "cyan": "blue", "indigo": "blue",
    "bluish": "blue",
    "violet": "purple", "lavender": "purple", "lilac": "purple", "plum": "purple", "purplish": "purple",
    "tan": "beige", "khaki": "beige", "camel": "beige",
    "brownish": "brown",
    # Hair colours: in captions they come before hair nouns, so they count only with allow_hair.
    "blonde": "yellow", "blond": "yellow",
}


def palette_name(colour: str) -> str:
    """The palette colour a colour word belongs to ("grey" -> "gray", "navy" -> "blue")."""
    return COLOR_FAMILY.get(colour.lower(), colour.lower())


# Shade words that belong to the colour they precede ("dark blue", "light-gray", "hot pink"):
# the replacement takes the whole shade. Alone ("dark pants", "light colored") they are no colour.
SHADE_MODIFIERS = frozenset(
    "dark darker light lighter bright pale deep hot neon baby sky royal forest army kelly "
    "dusty medium muted faded vivid dull powder electric off pastel soft rich".split()
)

# Garments, accessories worn or carried (bags, umbrellas, glasses, watches), and garment
# parts (sleeves, soles, stripes): changing their colour changes what the person wears.
# Carried objects that are not accessories (phones, books, cups, bicycles) are left out.
# Parts and patterns of a garment: their colour is the garment's ("a white shirt with black sleeves").
# Printed motifs (logos, writing, designs, graphics) are left out: small, and not always on clothes.
GARMENT_PARTS = frozenset(
    "collar sleeves sleeve cuffs soles sole laces straps strap trim stripes stripe dots lining frames frame".split()
)

GARMENT_NOUNS = frozenset(
    """
    shirt shirts t tshirt tshirts teeshirt tee tees top tops tank tanks blouse blouses jacket jackets coat coats
    overcoat hoodie hoodies hoody sweater sweaters sweatshirt sweatshirts vest vests dress dresses skirt skirts
    miniskirt pants pant trousers trouser jeans shorts leggings tights capris slacks sweatpants sweats
    joggers khakis overalls jumpsuit romper cardigan blazer suit suits uniform outfit clothes clothing gown robe
    tunic poncho parka windbreaker pullover jersey polo turtleneck camisole undershirt bottoms shawl
    sihrt shrit
    shoes shoe sneakers sneaker boots boot sandals sandal sandles heels flats slippers loafers flops trainers
    socks sock stockings pantyhose
    bag bags backpack backpacks pack handbag handbags purse purses tote totes satchel briefcase suitcase
    luggage bookbag knapsack pocketbook
    umbrella hat hats cap caps beanie helmet hood scarf scarves belt gloves glove mittens glasses sunglasses
    eyeglasses watch headband headphones earphones earbuds buds necklace bracelet earrings tie bowtie bow mask
    apron veil vail skort leggins handbg pans
    """.split()
) | GARMENT_PARTS

# The garment kinds colour-edit sensitivity is reported by (the last word of the edited phrase);
# everything else a colour edit can name (shoes, bags, headwear, parts) is "other".
UPPER_GARMENTS = frozenset(
    """
    shirt shirts tshirt tshirts teeshirt tee tees top tops tank tanks blouse blouses jacket jackets coat coats
    overcoat hoodie hoodies hoody sweater sweaters sweatshirt sweatshirts vest vests dress dresses cardigan
    blazer parka windbreaker pullover jumper jersey polo turtleneck camisole undershirt tunic poncho gown
    """.split()
)
LOWER_GARMENTS = frozenset(
    """
    skirt skirts miniskirt skort pants pant trousers trouser jeans shorts leggings leggins tights capris slacks
    sweatpants sweats joggers khakis bottoms
    """.split()
)

HAIR_NOUNS = frozenset("hair haired ponytail bun braid braids beard mustache".split())

# Words that may stand between a colour and its noun: pattern, material, cut and fit
# adjectives, and the first parts of compound nouns ("tennis shoes", "shoulder bag").
FILLER_WORDS = frozenset(
    """
    colored coloured color colour toned
    striped stripped strip plaid checkered checked floral flowered flowery patterned printed print polka dot
    dotted spotted camouflage camo graphic logo
    leather denim jean cotton wool woolen woollen knit knitted silk satin suede canvas nylon fur furry fleece
    lace lacy velvet corduroy plastic rubber mesh sheer shiny sparkly glittery puffy puffer padded quilted
    hooded collared sleeveless sleeved short long length knee ankle thigh mid high low tight loose baggy fitted
    fitting skinny slim wide flared straight leg legged cropped capri cargo athletic sport sports sporty running
    tennis basketball gym casual formal business button buttoned down up zip zipper zippered zipped v neck
    crew turtle tube halter crop mini maxi pencil pleated ruffled flowing big large small little oversized
    heavy thin thick warm winter rain trench sweat track yoga bell flip slip shoulder messenger tote cross
    crossbody body shopping hand back book school sling duffel laptop paper baseball ball bucket cowboy sun
    flat wedge platform heeled ankle combat hiking work nike adidas converse puma matching plain solid simple
    dress tank tee polo bomber biker lightweight fanny horizontal horizontally vertical vertically henley bermuda
    wrist ballet heel walking stretch grocery jogging designer wedding safety rimmed framed over
    """.split()
)

# Multi-word fillers ("black slip-on shoes", "a black pair of shorts"); hyphens are skipped when matching.
FILLER_PHRASES = (("slip", "on"), ("see", "through"), ("over", "the", "shoulder"), ("pair", "of"), ("zip", "up"))

COLOR_CONJUNCTIONS = frozenset({"and", "or", "/", "&", ","})
COPULAS = frozenset({"is", "are", "was", "were", "appears", "appear", "looks", "look", "seems", "seem"})
# Words that bind a colour to the noun before it without a copula: "stripes in white and grey",
# "a sweater color blue and green".
POSTPOSED_LINKERS = frozenset({"in", "color", "colored", "colour", "coloured"})
RELATIVE_PRONOUNS = frozenset({"that", "which"})
# Adverbs that may stand between the copula and the colour: "his shoes are all black".
DEGREE_ADVERBS = frozenset({"all", "also", "mostly", "mainly", "both", "entirely", "completely", "primarily", "a"})
