"""Training machinery shared by `llmctl train` and `llmctl distill` (llmctl/stages/ holds their entry points).

Read in this order:

    stage.py        the lifecycle: run (checks, lock, torchrun) -> train: setup -> loop -> finish
    build.py        device and dtype, data, model, TrainingArguments, the Trainer with its checks
    callbacks.py    what each step adds: metrics, stopping (NaN, signal, budget), checkpoints, timing
    schedule.py     the time budget and the lr schedule fitted to it
    checkpoints.py  step-NNNNNN folders: complete, resumable, rotated
    finish.py       why it stopped, the result, the final model in RUN/train
    distributed.py  rank, world size, the collectives every rank joins
    launch.py       `--nproc N`: the same command under torchrun

callbacks.py imports transformers (and finish.py through it): stage.py loads them when training
starts, so importing a stage stays cheap.
"""
