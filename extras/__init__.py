"""What FedDPA itself does not need, each run from the repository's root as `python -m extras.NAME`:
export (PEFT folders, merged models), fetch (the paper's FLAN data), plot (figures of a run), bench and
bench_infer (the speed benchmark), flower_app and flower_run (the method over Flower)."""
