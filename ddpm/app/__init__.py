"""The experiment application behind `dvc repro`: params.yaml's one reader (config.py), the
vocabulary of names (names.py), the pipeline's paths (paths.py), the results the report reads
(results.py), the report (report/) and MLflow tracking (tracking/).
"""
