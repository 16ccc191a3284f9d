"""What every stage runs: typed params and their validation (`config`, `validation`), the profiles
and the check of a stage's external inputs (`profile`), the hub policy (`hub`), atomic writes and
artifact errors (`io`), process set-up (`runtime`) and the launcher's ranks (`distributed`).

dvc.yaml depends on this folder in every stage, so editing any file here reruns them all."""
