"""Training sets from the user's pictures: scan folders and zips, curate (duplicates, crops, captions, CLIP
scores) and save. May import studio.config, files and models."""
