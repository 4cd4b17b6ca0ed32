"""The federated process: TFF learning templates plus client and server masking."""
