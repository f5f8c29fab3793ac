"""MLP-Mixer on CIFAR-100: config, data, model, training, evaluation."""
