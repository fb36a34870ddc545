"""Live transcription: speech from the ring goes to a remote STT endpoint in chunks.

The stage reads the ring from its own cursor, mixes down and resamples to the
STT format (16 kHz mono by default), and cuts chunks: every N seconds (`fixed`)
or at pauses in speech (`vad`, which sends nothing for silence). Each chunk is
sent as a complete Ogg Opus file in one of three wire protocols (`openai`,
`deepgram`, `raw`), best effort, and every transcript is appended to a JSONL
file per UTC day.

Modules: `vad` (speech detectors), `chunking` (cutting PCM into chunks),
`backlog` (chunks waiting to be sent), `transcripts` (the log on disk),
`protocols` (requests and answers of the wire protocols), `streamer` (the Trio
task). A stage: it imports only the bottom layer; never agent, another stage,
metrics or api.
"""

from ..wire import CHUNK_FILENAME, RAW_CONTENT_TYPE, RAW_HEADERS
from .backlog import Backlog, Chunk
from .chunking import Chunker, Cut, FixedChunker, StreamCutter, VadChunker, make_chunker
from .streamer import SttStats, SttStreamer
from .transcripts import Transcript, TranscriptLog, read_transcripts
from .vad import VAD_FRAME_MS, VAD_RATES, EnergyVad, Vad, WebRtcVad, make_vad

__all__ = [
    "CHUNK_FILENAME",
    "RAW_CONTENT_TYPE",
    "RAW_HEADERS",
    "VAD_FRAME_MS",
    "VAD_RATES",
    "Backlog",
    "Chunk",
    "Chunker",
    "Cut",
    "EnergyVad",
    "FixedChunker",
    "StreamCutter",
    "SttStats",
    "SttStreamer",
    "Transcript",
    "TranscriptLog",
    "Vad",
    "VadChunker",
    "WebRtcVad",
    "make_chunker",
    "make_vad",
    "read_transcripts",
]
