"""The pipeline's one declaration (declared.py), the code each stage runs (code.py, from the import graph) and the
dvc.yaml written from both (dvc_yaml.py, `ptune pipeline write|check`)."""
