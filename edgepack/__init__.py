"""edgepack: turn one trained model into verified deployment bundles for edge and browser targets."""

__version__ = "0.1.0"
