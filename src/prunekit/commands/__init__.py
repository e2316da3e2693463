"""The commands on paths, one module each: each loads a checkpoint, calls the in-memory core and saves.

``rundir`` holds what they share (the model and data record, the run directory, the images they draw);
``prunekit.api`` re-exports the public names of all of them.
"""
