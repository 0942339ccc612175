"""Network pieces: layers, models, torchvision weight conversion."""
