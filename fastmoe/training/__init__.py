"""What `fastmoe train` does, without the argument parsing (fastmoe/cli.py), one concern a module:

- `options`: the run's options, one per flag, and the checks of their values;
- `data`: the data set and the record formats trl's `SFTTrainer` trains on;
- `progress`: the progress bar;
- `sft`: the run itself: load the model, add LoRA, build the trainer, train, save and summarise.

With no model, the built-in AFMoE model (fastmoe.builtin) is built once into a cache folder; with no data set, the
instruction data shipped in the package is used. Both together make a run that learns visibly on a CPU in well
under a minute, which is what the CLI's defaults are tuned for.
"""
