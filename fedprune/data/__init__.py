"""Data: the datasets, how they are split among clients, and who takes part in a round."""
