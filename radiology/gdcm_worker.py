"""GDCM decoding in a child process, so that a damaged JPEG stream cannot kill the caller.

GDCM is the only permissively licensed JPEG Lossless decoder pydicom can use, but on some damaged
or inconsistent streams it aborts its whole process (a C++ assertion, not a Python exception):
one bad upload would stop the demo server, one bad file a training run. radiology.dicom therefore
sends GDCM's frames here. The child receives only the compressed frame and the pixel-module
numbers (never the rest of the header), decodes it with pydicom's GDCM plugin and sends the array
back; if it dies or hangs, the caller gets GdcmWorkerError and the next call starts a new child.

    python -m radiology.gdcm_worker    # the child's entry point (it reads requests on stdin)

A plain subprocess rather than multiprocessing: DataLoader and datasets workers are daemonic
processes, which multiprocessing forbids to have children.
"""

from __future__ import annotations

import atexit
import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import Any, BinaryIO

import numpy as np

__all__ = ["GdcmWorkerError", "decode_with_gdcm"]

_TIMEOUT_S = 60.0  # a frame GDCM has not decoded in a minute is not going to decode


class GdcmWorkerError(RuntimeError):
    """The GDCM child died, hung or failed on this frame; the reason holds no header value."""


# --------------------------------------------------------------------------- protocol


def _send(stream: BinaryIO, message: Any) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(payload)) + payload)
    stream.flush()


def _receive(stream: BinaryIO) -> Any:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("the GDCM worker closed its output")
    (size,) = struct.unpack("<Q", head)
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError("the GDCM worker closed its output")
    # Only ever our own child's replies (or, in the child, our parent's requests).
    return pickle.loads(payload)  # noqa: S301


# --------------------------------------------------------------------------- child


def _decode(transfer_syntax: str, pixel: dict[str, Any], frame: bytes) -> np.ndarray:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.pixels import pixel_array

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    for keyword, value in pixel.items():
        setattr(ds, keyword, value)
    ds.NumberOfFrames = 1
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return pixel_array(ds, index=0, decoding_plugin="gdcm")


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """Answer decode requests until the parent closes stdin."""
    import warnings

    warnings.simplefilter("ignore")
    while True:
        try:
            transfer_syntax, pixel, frame = _receive(requests)
        except EOFError:
            return
        try:
            _send(replies, ("ok", _decode(transfer_syntax, pixel, frame)))
        except Exception as err:  # noqa: BLE001 - reported to the parent by type only
            _send(replies, ("error", type(err).__name__))


# --------------------------------------------------------------------------- parent


class _Worker:
    """One long-lived child, started on first use, restarted after it dies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        atexit.register(self.close)

    def close(self) -> None:
        """End the child: closing its input ends its loop."""
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                self._process.stdin.close()  # type: ignore[union-attr]
                try:
                    self._process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            if self._process is not None:
                self._process.stdout.close()  # type: ignore[union-attr]
            self._process = None

    def _child(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # so the child finds radiology
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
            self._process = subprocess.Popen(
                [sys.executable, "-m", "radiology.gdcm_worker"],
                env={**os.environ, "PYTHONPATH": path},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,  # GDCM's own diagnostics; the error raised here says enough
            )
        return self._process

    def _stop(self, exchange: threading.Thread) -> None:
        # Killing the child ends the exchange's blocked read or write; only then are its pipes closed.
        assert self._process is not None
        self._process.kill()
        self._process.wait()
        exchange.join()
        for stream in (self._process.stdin, self._process.stdout):
            stream.close()  # type: ignore[union-attr]
        self._process = None

    def decode(self, transfer_syntax: str, pixel: dict[str, Any], frame: bytes, timeout: float) -> np.ndarray:
        with self._lock:
            child = self._child()
            reply: dict[str, Any] = {}

            def exchange() -> None:
                try:
                    _send(child.stdin, (transfer_syntax, pixel, frame))  # type: ignore[arg-type]
                    reply["message"] = _receive(child.stdout)  # type: ignore[arg-type]
                except Exception as err:  # noqa: BLE001 - a dead child shows as EOF or a broken pipe
                    reply["failure"] = err

            # The exchange runs in a thread so that a hung child can be killed after the timeout.
            thread = threading.Thread(target=exchange, daemon=True)
            thread.start()
            thread.join(timeout)
            if thread.is_alive():
                self._stop(thread)
                raise GdcmWorkerError("GDCM did not finish in time")
            if "failure" in reply:
                self._stop(thread)
                raise GdcmWorkerError("GDCM stopped on the damaged stream")
        status, value = reply["message"]
        if status != "ok":
            raise GdcmWorkerError(f"GDCM failed with {value}")
        return value


_WORKER = _Worker()


def decode_with_gdcm(
    transfer_syntax: str, pixel: dict[str, Any], frame: bytes, timeout: float = _TIMEOUT_S
) -> np.ndarray:
    """Decode one compressed frame with pydicom's GDCM plugin in the child process.

    ``pixel`` holds the Image Pixel module values by keyword (Rows, Columns, SamplesPerPixel,
    PhotometricInterpretation, BitsAllocated, BitsStored, PixelRepresentation, PlanarConfiguration).
    Raises GdcmWorkerError when the child fails, dies or hangs.
    """
    return _WORKER.decode(transfer_syntax, pixel, frame, timeout)


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
