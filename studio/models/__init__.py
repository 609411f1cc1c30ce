"""The one owner of loaded models (manager.py): sources resolved, checkpoint families told apart, loaded offline,
placed on a device, compiled. May import studio.config and studio.files only."""
