"""Coverage-guided fuzzing of the task-message decoder with atheris (optional, not in CI).

The Hypothesis tests (tests/unit/test_fuzz_protocol.py) generate messages
from a model of what a message looks like; this harness lets libFuzzer
mutate raw bytes guided by the branches they reach in ``protocol/`` (the
JSON fast path, kombu's fallback, ``peek``/``parse``), which finds inputs a
model does not think of. The property is the same: only the exceptions
protocol/message.py documents may come out.

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/fuzz_protocol.py -runs=1000000 -max_len=4096
    .venv/bin/python tests/fuzz/fuzz_protocol.py corpus_dir/   # keep a corpus

Any other exception is a crash: libFuzzer stops, prints the traceback and
writes the input to ``crash-<sha1>`` (replay it by passing that file).
docs/reliability.md#fuzzing has the last long run.
"""

from __future__ import annotations

import json
import sys
from datetime import timezone

import atheris

with atheris.instrument_imports(include=["celerycompat"]):
    from celerycompat.consumer.decoder import make_decoder
    from celerycompat.protocol import codecs
    from celerycompat.protocol import message as wire

DOCUMENTED = (wire.UnknownMessage, wire.InvalidTaskMessage, wire.BodyUndecodable,
              codecs.ContentDisallowed)
DECODE = make_decoder(["json", "yaml", "msgpack"], 1 << 16)
KNOWN = "t.known"
CONTENT_TYPES = ["application/json", "application/x-yaml", "application/x-msgpack",
                 "application/x-python-serialize", "application/data", "text/plain", None]
FIELDS = ["task", "id", "eta", "expires", "retries", "timelimit", "ignore_result", "shadow",
          "argsrepr", "root_id", "parent_id", "stamped_headers", "stamps", "group"]


def _value(data: atheris.FuzzedDataProvider, depth: int = 0):
    kind = data.ConsumeIntInRange(0, 8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return data.ConsumeBool()
    if kind == 2:
        return data.ConsumeInt(9)
    if kind == 3:
        return data.ConsumeFloat()
    if kind == 4:
        return data.ConsumeUnicodeNoSurrogates(data.ConsumeIntInRange(0, 40))
    if kind == 5:
        return KNOWN
    if kind == 6:
        return [_value(data, depth + 1) for _ in range(data.ConsumeIntInRange(0, 3))]
    if kind == 7:
        return {data.ConsumeUnicodeNoSurrogates(6): _value(data, depth + 1)
                for _ in range(data.ConsumeIntInRange(0, 3))}
    return data.ConsumeBytes(data.ConsumeIntInRange(0, 20))


def _body(data: atheris.FuzzedDataProvider) -> bytes:
    """Raw bytes, or JSON built from the input (a v2 ``[args, kwargs, embed]`` or
    any value, a v1 mapping): libFuzzer alone rarely mutates its way to JSON
    that gets past the decoder."""
    kind = data.ConsumeIntInRange(0, 3)
    if kind == 0:
        return data.ConsumeBytes(data.remaining_bytes())
    if kind == 1:
        value = [_value(data), _value(data), _value(data)]
    elif kind == 2:
        value = {name: _value(data) for name in ("task", "id", "args", "kwargs", "eta",
                                                 "retries", "timelimit", "utc")
                 if data.ConsumeBool()}
    else:
        value = _value(data)
    try:
        return json.dumps(value, default=repr).encode() + data.ConsumeBytes(
            data.ConsumeIntInRange(0, 4))
    except (ValueError, TypeError):
        return b""


def test_one_input(raw: bytes) -> None:
    data = atheris.FuzzedDataProvider(raw)
    content_type = CONTENT_TYPES[data.ConsumeIntInRange(0, len(CONTENT_TYPES) - 1)]
    headers = {"task": KNOWN, "id": "0b5a7e44-6d0c-4f7a-9a53-0c2f4d6b0a11"}
    for name in FIELDS:
        choice = data.ConsumeIntInRange(0, 3)
        if choice == 1:
            headers.pop(name, None)
        elif choice >= 2:
            headers[name] = _value(data)
    body = _body(data)
    try:
        peeked = wire.peek(headers, body, content_type, "utf-8", DECODE)
        hash(peeked.task)
        if peeked.task == KNOWN:
            wire.parse(peeked, headers, {}, {}, body, content_type, "utf-8", DECODE,
                       worker_utc=True, worker_tz=timezone.utc)
    except DOCUMENTED:
        pass


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
