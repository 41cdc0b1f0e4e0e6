"""Privacy mechanisms: differential privacy (clipping, Gaussian noise, the RDP accountant), CKKS secure aggregation."""
