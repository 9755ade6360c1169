"""The networks: the SD U-Net (runnable point by point), the VAE (with its loss terms), the CLIP text
encoder and the AFA ensemble with its SABW aggregators. Plain torch modules: nothing here reads or
writes files, trains or exports."""
