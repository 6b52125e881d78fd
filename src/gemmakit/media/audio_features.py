"""Audio in for Gemma 4: a file to 16 kHz mono samples, samples to log-mel frames, frames to a prompt.

Design:
- One reader for every container libsndfile decodes (WAV, FLAC, OGG/Vorbis/Opus, MP3), downmixed by averaging
  channels and brought to 16 kHz with a polyphase filter (scipy's resample_poly), which takes the rational
  ratio of any common rate to 16 kHz in one step and needs no extra codec or ffmpeg. Length is checked from
  the header before decoding, so an hour-long file is refused without being read.
- Clips over 30 s are refused rather than cut silently: transformers truncates them, so the model would
  answer about part of the clip while the user thinks it heard it all. Callers who want truncation cut first.
- The log-mel frames are transformers' `Gemma4AudioFeatureExtractor` (its defaults, which the released
  checkpoints use) rebuilt in numpy with the same dtype path (float32 frames and FFT, float64 filterbank and
  log, float32 out), so the features agree to float32 rounding rather than approximately.
- The soft-token count of a clip comes from its mask the way the processor computes it (two stride-2 halvings
  of the real frames), so the prompt always holds as many `<|audio|>` as the tower yields tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from gemmakit.media.common import expand_placeholders

SAMPLE_RATE = 16_000
MAX_SAMPLES = 30 * SAMPLE_RATE  # the extractor's max_length; 750 soft tokens
PAD_MULTIPLE = 128  # the extractor pads the batch's longest clip to a multiple of this
FRAME_LENGTH = 320  # 20 ms windows ...
HOP_LENGTH = 160  # ... every 10 ms
FFT_LENGTH = 512  # next power of two above the frame
N_MELS = 128
MEL_FLOOR = 1e-3  # added before the log
MIN_HZ, MAX_HZ = 0.0, 8000.0

AUDIO_TOKEN, BEGIN_AUDIO, END_AUDIO = "<|audio|>", "<|audio>", "<audio|>"


class AudioFileError(ValueError):
    """An audio file that cannot be used; the message says what is wrong and what to do."""


def read_audio(path: str | Path | BinaryIO, max_seconds: float = MAX_SAMPLES / SAMPLE_RATE) -> np.ndarray:
    """Decode an audio file (a path or an open binary file) to mono float32 samples at 16 kHz; refuse empty,
    unreadable or too long files."""
    import soundfile

    if isinstance(path, str | Path):
        path = Path(path)
        if not path.is_file():
            raise AudioFileError(f"{path}: no such audio file; give the path of a WAV, FLAC, OGG or MP3 file")
        source: Any = str(path)
    else:
        source, path = path, "the audio"
    try:
        info = soundfile.info(source)
    except (RuntimeError, soundfile.LibsndfileError) as e:
        why = f" ({e})" if isinstance(source, str) else ""  # libsndfile names a file object by its repr
        raise AudioFileError(f"{path}: not a readable audio file{why}; convert it to WAV, FLAC, OGG or MP3, "
                             "e.g. `ffmpeg -i INPUT -ar 16000 -ac 1 out.wav`") from None
    if not isinstance(source, str):
        source.seek(0)
    if info.samplerate <= 0 or info.channels <= 0:
        raise AudioFileError(f"{path}: the header gives {info.samplerate} Hz and {info.channels} channels; "
                             "re-encode the file")
    seconds = info.frames / info.samplerate
    if seconds > max_seconds + 1 / info.samplerate:
        raise AudioFileError(f"{path}: {seconds:.1f} s of audio, over the {max_seconds:g} s one clip may hold; "
                             f"cut it into clips of at most {max_seconds:g} s (e.g. ffmpeg -ss START -t "
                             f"{max_seconds:g}) and pass them one by one")
    try:
        data, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as e:
        raise AudioFileError(f"{path}: decoding failed ({e}); the file may be truncated or damaged, "
                             "re-encode it (e.g. `ffmpeg -i INPUT -ar 16000 -ac 1 out.wav`)") from None
    if data.shape[0] == 0:
        raise AudioFileError(f"{path}: the file holds no audio samples; record or export it again")
    if not np.isfinite(data).all():
        raise AudioFileError(f"{path}: the file holds NaN or infinite samples; re-encode it as PCM")
    return resample_to_16k(data.mean(axis=1), rate)


def resample_to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """Mono samples at `rate` Hz -> float32 samples at 16 kHz (polyphase filter, exact integer ratio)."""
    samples = np.asarray(samples, dtype=np.float32)
    if rate == SAMPLE_RATE:
        return samples
    from scipy.signal import resample_poly

    g = math.gcd(SAMPLE_RATE, int(rate))
    return resample_poly(samples, SAMPLE_RATE // g, int(rate) // g).astype(np.float32)


def mel_filterbank() -> np.ndarray:
    """[FFT_LENGTH // 2 + 1, N_MELS] triangular HTK-mel filters over linear FFT bins, not area-normalised."""
    def to_mel(hz):
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    mel_edges = np.linspace(to_mel(MIN_HZ), to_mel(MAX_HZ), N_MELS + 2)
    hz_edges = 700.0 * (np.power(10.0, mel_edges / 2595.0) - 1.0)
    bins = np.linspace(0, SAMPLE_RATE // 2, FFT_LENGTH // 2 + 1)
    offset = hz_edges[None, :] - bins[:, None]  # [bins, edges]
    width = np.diff(hz_edges)
    rising = -offset[:, :-2] / width[:-1]
    falling = offset[:, 2:] / width[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


def _hann() -> np.ndarray:
    # periodic Hann: the first FRAME_LENGTH points of a FRAME_LENGTH + 1 symmetric window
    return np.hanning(FRAME_LENGTH + 1)[:-1].astype(np.float32)


def log_mel(samples: np.ndarray, real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One padded clip and its per-sample real/padding flags -> (frames [T, N_MELS] float32, frame mask [T])."""
    half = FRAME_LENGTH // 2  # semicausal: the first frame is centred on the first sample
    samples = np.concatenate([np.zeros(half, np.float32), samples.astype(np.float32, copy=False)])
    real = np.concatenate([np.zeros(half, bool), real])
    span = FRAME_LENGTH + 1  # the extractor slices one extra sample (for pre-emphasis, unused at 0)
    n_frames = max(0, (samples.size - span) // HOP_LENGTH + 1)
    starts = np.arange(n_frames) * HOP_LENGTH
    frames = samples[starts[:, None] + np.arange(FRAME_LENGTH)[None, :]] * _hann()
    magnitude = np.abs(np.fft.rfft(frames, n=FFT_LENGTH, axis=-1))
    logmel = np.log(magnitude @ mel_filterbank() + np.float64(MEL_FLOOR)).astype(np.float32)
    mask = real[starts + span - 1]  # a frame counts only when its whole span is real audio
    return logmel * mask[:, None], mask


@dataclass
class AudioFeatures:
    """The processor's audio outputs for a batch of clips (padded to the longest)."""

    input_features: np.ndarray  # [clips, frames, 128] float32; padded frames are zero
    input_features_mask: np.ndarray  # [clips, frames] bool; True where the frame is real audio
    num_soft_tokens: list[int]  # per clip: tokens the audio tower yields, `<|audio|>` copies in the prompt


def extract_features(clips: Sequence[np.ndarray]) -> AudioFeatures:
    """Log-mel frames of mono 16 kHz clips, as transformers' Gemma 4 feature extractor gives them (30 s cap)."""
    if isinstance(clips, np.ndarray) and clips.ndim == 1:
        raise ValueError("extract_features takes a list of clips; wrap a single clip as [clip]")
    clips = [np.asarray(c, dtype=np.float32)[:MAX_SAMPLES] for c in clips]
    if not clips:
        raise ValueError("extract_features needs at least one clip")
    for i, c in enumerate(clips):
        if c.ndim != 1:
            raise ValueError(f"clip {i} has shape {c.shape}; pass mono samples (1-D), e.g. from read_audio")
        if soft_tokens_for_samples(c.size) == 0:
            raise ValueError(f"clip {i} holds {c.size} samples, too short to give one audio token; give at "
                             f"least {HOP_LENGTH + 1} samples (about 10 ms at 16 kHz)")
    longest = max(c.size for c in clips)
    padded = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    features, masks = [], []
    for c in clips:
        real = np.arange(padded) < c.size
        f, m = log_mel(np.pad(c, (0, padded - c.size)), real)
        features.append(f)
        masks.append(m)
    mask = np.stack(masks)
    return AudioFeatures(np.stack(features), mask, [soft_tokens_from_mask(m) for m in mask])


def soft_tokens_from_mask(frame_mask: np.ndarray) -> int:
    """Soft tokens for one clip: the real frames left after the tower's two stride-2 subsamplings."""
    m = np.asarray(frame_mask, dtype=bool)
    for _ in range(2):
        m = m[::2]
    return int(m.sum())


def soft_tokens_for_samples(num_samples: int) -> int:
    """Soft tokens for a clip of `num_samples` 16 kHz samples (after the 30 s cap), without computing features."""
    n = min(int(num_samples), MAX_SAMPLES)
    real_frames = max(0, (n - 1) // HOP_LENGTH)  # frames whose whole span lies inside the clip
    return -(-real_frames // 4)


def audio_placeholder(num_soft_tokens: int) -> str:
    """The text one `<|audio|>` of a rendered prompt becomes for a clip of `num_soft_tokens` tokens."""
    return BEGIN_AUDIO + AUDIO_TOKEN * num_soft_tokens + END_AUDIO


def expand_audio_prompt(text: str, num_soft_tokens: Sequence[int]) -> str:
    """Replace each `<|audio|>` of a rendered prompt, in order, by its clip's begin/tokens/end run."""
    return expand_placeholders(text, AUDIO_TOKEN, [audio_placeholder(n) for n in num_soft_tokens], "clips")
