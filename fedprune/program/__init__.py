"""The program: one experiment run round by round, with evaluation and checkpoints."""
