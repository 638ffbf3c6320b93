"""isekai: click a person in a photo, get them back as an anime character, served by NVIDIA Triton."""
