"""Audio building blocks: PCM formats and levels, resampling, Ogg Opus encode/decode."""
