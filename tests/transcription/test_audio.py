"""Audio intake: only real MP3 gets in, and its length is what it plays for, not what it claims."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mutagen.id3 import ID3, TIT2

from tests.fixtures.audio import (
    make_encoded_audio,
    make_mp3,
    make_random_bytes,
    make_truncated_mp3,
)
from transcription.audio import HEAD_BYTES, probe_mp3
from transcription.errors import (
    AudioTooLong,
    EmptyAudio,
    UndecodableAudio,
    UnsupportedMediaType,
)

HOUR = 3600.0


def id3_header(body_size: int) -> bytes:
    """An ID3v2.4 tag header announcing ``body_size`` bytes of frames and padding."""
    syncsafe = bytes((body_size >> shift) & 0x7F for shift in (21, 14, 7, 0))
    return b"ID3\x04\x00\x00" + syncsafe


# Measuring


def test_a_plain_mp3_is_measured(mp3_5s: Path) -> None:
    info = probe_mp3(mp3_5s, max_seconds=HOUR)
    assert info.duration == pytest.approx(5.0, abs=0.1)
    assert info.declared_duration == pytest.approx(5.0, abs=0.1)
    assert (info.sample_rate, info.channels, info.bitrate) == (16000, 1, 32000)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"vbr": True}, id="vbr"),
        pytest.param({"vbr": True, "xing": False}, id="vbr-without-xing-header"),
        pytest.param({"tone": False}, id="noise"),
        pytest.param(
            {"bitrate": 128000, "sample_rate": 44100, "channels": 2, "id3": True},
            id="mpeg1-stereo-id3",
        ),
        pytest.param({"bitrate": 16000, "sample_rate": 8000}, id="mpeg2.5"),
    ],
)
def test_duration_is_measured_whatever_the_encoding(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    path = tmp_path / "audio.mp3"
    true_seconds = make_mp3(path, 10, **options)
    info = probe_mp3(path, max_seconds=HOUR)
    assert info.duration == pytest.approx(true_seconds, abs=0.05)
    assert info.sample_rate == options.get("sample_rate", 16000)
    assert info.channels == options.get("channels", 1)


def test_vbr_without_a_header_is_still_measured_right(tmp_path: Path) -> None:
    path = tmp_path / "vbr.mp3"
    true_seconds = make_mp3(path, 30, vbr=True, xing=False)
    info = probe_mp3(path, max_seconds=HOUR)
    assert info.declared_duration is not None
    assert abs(info.declared_duration - true_seconds) > 5  # the header guess is far off
    assert info.duration == pytest.approx(true_seconds, abs=0.05)


def test_the_vbr_fixture_really_varies_its_bitrate(tmp_path: Path) -> None:
    path = tmp_path / "vbr.mp3"
    make_mp3(path, 10, vbr=True)
    info = probe_mp3(path, max_seconds=HOUR)
    assert info.bitrate is not None
    assert info.bitrate not in (8000, 16000, 24000, 32000, 40000, 48000, 56000, 64000)


def test_gapless_padding_from_a_lame_tag_is_not_counted(tmp_path: Path) -> None:
    path = tmp_path / "lame.mp3"
    make_encoded_audio(path, 5, codec="libmp3lame", container="mp3")
    info = probe_mp3(path, max_seconds=HOUR)
    assert info.duration == pytest.approx(5.0, abs=0.01)


def test_a_truncated_file_counts_what_remains(truncated_mp3: Path) -> None:
    info = probe_mp3(truncated_mp3, max_seconds=HOUR)
    assert info.declared_duration == pytest.approx(10.0, abs=0.1)
    assert info.duration == pytest.approx(6.0, abs=0.1)


def test_truncation_costs_at_most_the_cut_frame(tmp_path: Path) -> None:
    path = tmp_path / "cut.mp3"
    whole_frames_seconds = make_truncated_mp3(path, 20, keep=0.3)
    info = probe_mp3(path, max_seconds=HOUR)
    assert whole_frames_seconds <= info.duration <= whole_frames_seconds + 0.04


# Limits


def test_audio_over_the_limit_is_refused_with_its_length(mp3_over_hour: Path) -> None:
    with pytest.raises(AudioTooLong) as caught:
        probe_mp3(mp3_over_hour, max_seconds=HOUR)
    assert caught.value.message == "The audio is about 1h 0m 5s long; the limit is 1h 0m 0s."
    assert caught.value.param == "file"


def test_a_short_file_over_a_short_limit_gets_an_exact_length(mp3_5s: Path) -> None:
    with pytest.raises(AudioTooLong, match=r"^The audio is 5s long; the limit is 4s\.$"):
        probe_mp3(mp3_5s, max_seconds=4)


def test_audio_just_under_the_limit_is_accepted(mp3_5s: Path) -> None:
    assert probe_mp3(mp3_5s, max_seconds=5.1).duration <= 5.1


def test_a_header_that_lies_low_does_not_buy_more_audio(lying_header_mp3: Path) -> None:
    with pytest.raises(AudioTooLong, match=r"about 1h 10m 0s long"):
        probe_mp3(lying_header_mp3, max_seconds=HOUR)


def test_a_lying_header_is_reported_but_not_believed(lying_header_mp3: Path) -> None:
    info = probe_mp3(lying_header_mp3, max_seconds=2 * HOUR)
    assert info.declared_duration == pytest.approx(600.0, abs=0.1)
    assert info.duration == pytest.approx(4200.0, abs=0.1)


# Refusals


def test_an_empty_file_is_refused(empty_file: Path) -> None:
    with pytest.raises(EmptyAudio, match="empty"):
        probe_mp3(empty_file, max_seconds=HOUR)


def test_a_tag_without_audio_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tag-only.mp3"
    path.write_bytes(id3_header(100) + bytes(100))
    with pytest.raises(EmptyAudio, match="no audio"):
        probe_mp3(path, max_seconds=HOUR)


def test_a_click_is_too_short_to_transcribe(tmp_path: Path) -> None:
    path = tmp_path / "click.mp3"
    make_mp3(path, 0.07)  # two frames
    with pytest.raises(UndecodableAudio, match="too little to transcribe"):
        probe_mp3(path, max_seconds=HOUR)


def test_a_renamed_wav_is_refused_as_wav(wav_renamed_mp3: Path) -> None:
    with pytest.raises(UnsupportedMediaType) as caught:
        probe_mp3(wav_renamed_mp3, max_seconds=HOUR)
    assert caught.value.message == "The file is a WAV (RIFF) file; only MP3 audio is accepted."


@pytest.mark.parametrize(
    ("codec", "container", "sample_rate", "named"),
    [
        ("flac", "flac", 16000, "a FLAC file"),
        ("opus", "ogg", 48000, "an Ogg (Vorbis or Opus) file"),
        ("aac", "ipod", 16000, "an MP4/M4A file"),
        ("aac", "adts", 16000, "AAC audio (ADTS)"),
        ("opus", "webm", 48000, "a Matroska/WebM file"),
        ("mp2", "mp2", 16000, "MPEG layer I/II audio (MP1/MP2)"),
    ],
)
def test_other_audio_formats_are_refused_by_name(
    tmp_path: Path, codec: str, container: str, sample_rate: int, named: str
) -> None:
    path = tmp_path / "upload.mp3"
    make_encoded_audio(path, 2, codec=codec, container=container, sample_rate=sample_rate)
    with pytest.raises(UnsupportedMediaType, match=re.escape(named)):
        probe_mp3(path, max_seconds=HOUR)


def test_text_is_refused_as_text(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp3"
    path.write_text("Meeting notes\n\n- ship the thing\n- überprüfen\n")
    with pytest.raises(UnsupportedMediaType, match="is a text file"):
        probe_mp3(path, max_seconds=HOUR)


def test_random_bytes_are_refused(not_audio_file: Path) -> None:
    with pytest.raises(UnsupportedMediaType, match="does not look like MP3 audio"):
        probe_mp3(not_audio_file, max_seconds=HOUR)


def test_a_tag_in_front_of_noise_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tagged-noise.mp3"
    make_random_bytes(path, 100_000)
    path.write_bytes(id3_header(80_000) + path.read_bytes())
    with pytest.raises(UnsupportedMediaType):  # the probe looks past the tag
        probe_mp3(path, max_seconds=HOUR)


def test_mp3_followed_by_garbage_is_refused_as_damaged(tmp_path: Path) -> None:
    path = tmp_path / "damaged.mp3"
    make_mp3(path, 5)
    garbage = tmp_path / "garbage.bin"
    make_random_bytes(garbage, 500_000, seed=1)
    with path.open("ab") as file:
        file.write(garbage.read_bytes())
    with pytest.raises(UndecodableAudio, match="does not decode"):
        probe_mp3(path, max_seconds=HOUR)


# Recognising MP3 behind tags


def test_padding_and_a_little_junk_after_the_tag_are_tolerated(
    mp3_5s: Path, tmp_path: Path
) -> None:
    path = tmp_path / "padded.mp3"
    path.write_bytes(id3_header(50) + bytes(50) + b"\x00" * 9 + b"junk" + mp3_5s.read_bytes())
    assert probe_mp3(path, max_seconds=HOUR).duration == pytest.approx(5.0, abs=0.1)


def test_cover_art_larger_than_the_head_does_not_hide_the_audio(tmp_path: Path) -> None:
    path = tmp_path / "cover.mp3"
    make_mp3(path, 5)
    tags = ID3()
    tags.add(TIT2(encoding=3, text=["With a big cover"]))
    tags.save(path, padding=lambda info: 2 * HEAD_BYTES)
    assert probe_mp3(path, max_seconds=HOUR).duration == pytest.approx(5.0, abs=0.1)


@pytest.mark.parametrize(
    "content",
    [
        b"\x00" * HEAD_BYTES,
        b"\xff" * 1000,
        b"ID3",
        id3_header(100) + bytes(100) + b"hello, world\n" * 100,
    ],
    ids=["zeros", "all-ones", "bare-id3", "tag-then-text"],
)
def test_things_that_are_not_mp3_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "upload.mp3"
    path.write_bytes(content)
    with pytest.raises(UnsupportedMediaType):
        probe_mp3(path, max_seconds=HOUR)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=st.binary(min_size=1, max_size=4096))
def test_random_bytes_are_never_taken_for_mp3(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "upload.mp3"  # rewritten by every example
    path.write_bytes(content)
    with pytest.raises((EmptyAudio, UnsupportedMediaType)):
        probe_mp3(path, max_seconds=HOUR)
