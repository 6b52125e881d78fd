"""Images and audio for the Gemma 3 / Gemma 4 decoders.

The towers turn pixels or audio samples into soft tokens in the text model's space; the decoder then reads
them in place of placeholder tokens (`Media`, model.py), exactly where and how the reference does:

    siglip.py, gemma3_images.py           Gemma 3: SigLIP + projector; resize / pan-and-scan
    gemma4_vision.py, gemma4_images.py    Gemma 4: the ViT with 2-D RoPE and pooling; aspect-preserving patches
    gemma4_audio.py, audio_features.py    Gemma 4 E2B/E4B: the conformer; file reading and log-mel features
    gemma4_unified*.py                    Gemma 4 12B: encoder-free patch and raw-audio embedders
    soft.py                               where soft tokens go in a batch, and which ones see each other
    towers.py                             the towers a config asks for, and one `encode` over any of them
    prompt.py                             a prompt with images/audio -> token ids + the soft tokens they need
"""
