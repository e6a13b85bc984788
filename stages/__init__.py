"""DVC stages: one short module per stage (`python -m stages.<name>`), each a thin command over `ddpm`."""
