"""What every stage runs.

- `config`, `validation`: typed params and their validation.
- `profile`: the profiles and the check of a stage's external inputs.
- `hub`: the hub policy.
- `io`: atomic writes and artifact errors.
- `runtime`: process set-up.
- `distributed`: the launcher's ranks.

dvc.yaml depends on this folder in every stage, so editing any file here reruns them all."""
