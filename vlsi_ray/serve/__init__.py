"""Ray Serve app: an OpenAI-compatible endpoint for exported VLsI students."""
