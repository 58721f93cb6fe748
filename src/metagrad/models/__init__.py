from .conv import CNN, MNISTNet
