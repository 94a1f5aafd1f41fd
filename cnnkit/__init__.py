"""cnnkit: train a small image CNN, export it with a parity gate, and classify PNG folders fast."""

__version__ = "0.4.0"
