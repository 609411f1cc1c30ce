"""What steers a denoise besides the prompt: ControlNets (listing, loading, offline configs) and control images
(canny maps). May import studio.files and studio.models."""
