"""Audio building blocks: PCM formats and levels, resampling, Ogg Opus encode/decode.

The bottom of the stack but for ``errors``: pure codecs and DSP, no Trio, and
no import of any other part of the project.
"""
