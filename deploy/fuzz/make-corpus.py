#!/usr/bin/env python3
"""Writes the seed corpora of deploy/fuzz (deploy/fuzz/corpus/NAME/): valid inputs of each
parser, made here by hand from the formats (and the sample configs and plan in deploy/config),
so the fuzzer starts from inputs that reach deep. Rerun after a format change and commit."""
import base64
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
CONFIG = os.path.join(HERE, "..", "config")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


# --- protobuf wire format ------------------------------------------------------------------
def varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number, value):
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def record(seq, offset, data=b"", zero=0, captured=1_700_000_000_000_000_000, attached=0, resize=0):
    out = field(1, seq) + field(2, offset)
    if data:
        out += field(3, data)
    if zero:
        out += field(4, zero)
    out += field(5, captured)
    if attached:
        out += field(6, attached)
    if resize:
        out += field(7, resize)
    return out


def batch(records, volume=b"data", epoch=1, generation=1):
    return field(1, volume) + field(2, epoch) + b"".join(field(3, r) for r in records) + field(4, generation)


def envelope(body_field, body, id=0, reply=0, attachments=0):
    out = b""
    if id:
        out += field(1, id)
    if reply:
        out += field(2, reply)
    if attachments:
        out += field(3, attachments)
    return out + field(body_field, body)


def frame(payload):
    return struct.pack(">I", len(payload)) + payload


def frames():
    # First byte: how the stream is cut into reads (index into 1, 3, 7, 16, 64, 512, 4096, all).
    heartbeat = envelope(12, field(1, 1_700_000_000_000))
    write("fuzz-frames", "heartbeat", bytes([7]) + frame(heartbeat))
    inline = batch([record(1, 0, data=b"A" * 512), record(2, 4096, zero=8192)])
    write("fuzz-frames", "batch-inline", bytes([7]) + frame(envelope(100, inline, id=5)))
    # Attached bytes: two small writes share one frame, a larger one has its own.
    attached = batch([record(1, 0, attached=512), record(2, 512, attached=512), record(3, 8192, attached=4096),
                      record(4, 0, zero=4096)])
    stream = frame(envelope(100, attached, id=6, attachments=2)) + frame(b"a" * 1024) + frame(b"b" * 4096)
    write("fuzz-frames", "batch-attached", bytes([7]) + stream)
    write("fuzz-frames", "batch-attached-chunked", bytes([2]) + stream)
    # Past the fence (through sequence 8): a prefix is kept, with only its attached bytes.
    past = batch([record(7, 0, attached=512), record(8, 512, attached=512), record(9, 1024, attached=512)])
    write("fuzz-frames", "batch-past-fence", bytes([5]) + frame(envelope(100, past, id=7, attachments=1)) + frame(b"c" * 1536))
    two = frame(heartbeat) + frame(envelope(100, inline, id=8)) + frame(envelope(13, field(1, b"bye")))
    write("fuzz-frames", "several", bytes([4]) + two)
    # An online resize: later records lie past the volume's old end (1 MiB).
    grown = batch([record(1, 0, resize=4 << 20), record(2, (3 << 20), data=b"G" * 512), record(3, 1 << 20, zero=4096)])
    write("fuzz-frames", "batch-resize", bytes([7]) + frame(envelope(100, grown, id=9)))
    write("fuzz-frames", "error-reply", bytes([7]) + frame(envelope(14, field(1, 3) + field(2, b"no such volume"), reply=5)))


# --- NBD -------------------------------------------------------------------------------------
INIT_MAGIC = 0x4E42444D41474943
OPT_MAGIC = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY = 0x67446698
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_STRUCTURED = 1, 2, 3, 5, 6, 7, 8
OPT_LIST_META, OPT_SET_META = 9, 10
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 0, 1, 2, 3, 4, 6, 7


def option(opt, data=b""):
    return struct.pack(">QII", OPT_MAGIC, opt, len(data)) + data


def go_data(name, infos=(3,)):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def meta_data(name, queries):
    n = name.encode()
    return (struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q.encode())) + q.encode() for q in queries))


def request(cmd, handle, offset=0, length=0, flags=0, payload=b""):
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload


def transmission():
    return (request(CMD_WRITE, 1, 0, 512, payload=b"w" * 512) + request(CMD_READ, 2, 0, 1024)
            + request(CMD_WRITE, 3, 4096, 16, flags=1, payload=b"f" * 16) + request(CMD_FLUSH, 4)
            + request(CMD_TRIM, 5, 8192, 4096) + request(CMD_WRITE_ZEROES, 6, 0, 512) + request(CMD_READ, 7, 65000, 1000)
            + request(CMD_DISC, 8))


def nbd_server():
    flags = struct.pack(">I", 3)  # fixed newstyle, no zeroes
    write("fuzz-nbd-server", "go-structured", flags + option(OPT_STRUCTURED) + option(OPT_GO, go_data("disk")) + transmission())
    write("fuzz-nbd-server", "go-simple", flags + option(OPT_GO, go_data("disk", (0, 3))) + transmission())
    write("fuzz-nbd-server", "list-info-go-ro", flags + option(OPT_LIST) + option(OPT_INFO, go_data("ro")) + option(99)
          + option(OPT_STARTTLS) + option(OPT_GO, go_data("ro")) + request(CMD_READ, 1, 0, 4096) + request(CMD_WRITE, 2, 0, 8, payload=b"x" * 8)
          + request(CMD_DISC, 3))
    write("fuzz-nbd-server", "export-name", struct.pack(">I", 1) + option(OPT_EXPORT_NAME, b"disk") + request(CMD_READ, 1, 0, 512)
          + request(CMD_FLUSH, 2))
    write("fuzz-nbd-server", "block-status", flags + option(OPT_STRUCTURED) + option(OPT_LIST_META, meta_data("disk", []))
          + option(OPT_SET_META, meta_data("disk", ["base:allocation", "qemu:dirty-bitmap:x"])) + option(OPT_GO, go_data("disk"))
          + request(CMD_WRITE, 1, 4096, 16, payload=b"b" * 16) + request(CMD_BLOCK_STATUS, 2, 0, 65536)
          + request(CMD_BLOCK_STATUS, 3, 0, 65536, flags=8) + request(CMD_BLOCK_STATUS, 4, 65535, 2) + request(CMD_DISC, 5))
    write("fuzz-nbd-server", "abort", flags + option(OPT_GO, go_data("missing")) + option(OPT_ABORT))


def option_reply(opt, rtype, data=b""):
    return struct.pack(">QIII", REPLY_MAGIC, opt, rtype, len(data)) + data


def nbd_client():
    # First byte: chunking (bits 0-2) and whether the client sends DISC after its requests (bit 3).
    greeting = struct.pack(">QQH", INIT_MAGIC, OPT_MAGIC, 3)
    info = (option_reply(OPT_GO, 3, struct.pack(">HQH", 0, 65536, 0x1 | 0x4 | 0x8 | 0x20 | 0x40 | 0x100))
            + option_reply(OPT_GO, 3, struct.pack(">HIII", 3, 1, 4096, 32 << 20)) + option_reply(OPT_GO, 1))
    # Requests: 1 read 512, 2 write 512, 3 flush, 4 write-zeroes 4096, 5 read 8192.
    replies = (struct.pack(">IIQ", SIMPLE_REPLY, 0, 1) + b"r" * 512 + struct.pack(">IIQ", SIMPLE_REPLY, 0, 3)
               + struct.pack(">IIQ", SIMPLE_REPLY, 0, 2) + struct.pack(">IIQ", SIMPLE_REPLY, 5, 4)
               + struct.pack(">IIQ", SIMPLE_REPLY, 0, 5) + b"s" * 8192)
    write("fuzz-nbd-client", "session", bytes([7]) + greeting + info + replies)
    write("fuzz-nbd-client", "session-chunked-disc", bytes([8 | 3]) + greeting + info + replies)
    write("fuzz-nbd-client", "negotiation-only", bytes([5]) + greeting + info)
    # Bit 4: structured replies and base:allocation; request 6 is a block status of 64 KiB.
    structured_info = (option_reply(OPT_STRUCTURED, 1) + option_reply(OPT_SET_META, 4, struct.pack(">I", 1) + b"base:allocation")
                       + option_reply(OPT_SET_META, 1) + info)
    chunk = lambda flags, ctype, handle, data: struct.pack(">IHHQI", 0x668E33EF, flags, ctype, handle, len(data)) + data
    structured = (chunk(1, 1, 1, struct.pack(">Q", 0) + b"r" * 512) + struct.pack(">IIQ", SIMPLE_REPLY, 0, 2)
                  + struct.pack(">IIQ", SIMPLE_REPLY, 0, 3) + struct.pack(">IIQ", SIMPLE_REPLY, 0, 4)
                  + chunk(0, 1, 5, struct.pack(">Q", 4096) + b"s" * 4096) + chunk(0, 2, 5, struct.pack(">QI", 8192, 4096))
                  + chunk(1, 0, 5, b"")
                  + chunk(1, 5, 6, struct.pack(">IIIII", 1, 4096, 0, 61440, 3)))
    write("fuzz-nbd-client", "structured-block-status", bytes([0x10 | 7]) + greeting + structured_info + structured)
    write("fuzz-nbd-client", "structured-refused", bytes([0x10 | 5]) + greeting + option_reply(OPT_STRUCTURED, 1 << 31 | 1)
          + option_reply(OPT_SET_META, 1 << 31 | 3) + info + replies)
    write("fuzz-nbd-client", "go-refused", bytes([7]) + greeting + option_reply(OPT_GO, 1 << 31 | 6, b"no such export"))


# --- journal segments ------------------------------------------------------------------------
def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def journal_record(epoch, seq, offset, length, data=None, captured=1_700_000_000_000_000_000, kind=None):
    kind = kind if kind is not None else (1 if data is None else 0)
    rest = struct.pack(">QQQQIq", epoch, seq, offset, length, kind, captured)
    crc = crc32c(rest + (data or b""))
    return struct.pack(">II", 0x464A5232, crc) + rest + (data or b"")


def journal():
    recs = [journal_record(1, 1, 0, 512, b"j" * 512), journal_record(1, 2, 4096, 8192),
            journal_record(1, 3, 1 << 19, 16, b"k" * 16)]
    write("fuzz-journal", "segment", b"".join(recs))
    write("fuzz-journal", "torn-tail", b"".join(recs) + recs[0][:30])
    write("fuzz-journal", "one-zeroed", journal_record(2, 9, 0, 1 << 20))
    # A resize record (kind 2, the new size as its length) and records past the old end.
    write("fuzz-journal", "resized", b"".join([recs[0], journal_record(1, 2, 0, 4 << 20, kind=2),
                                               journal_record(1, 3, 3 << 20, 16, b"r" * 16), journal_record(1, 4, 1 << 20, 8192)]))


def main():
    shutil.rmtree(CORPUS, ignore_errors=True)
    frames()
    nbd_server()
    nbd_client()
    journal()
    for name in ("plan.yaml",):
        with open(os.path.join(CONFIG, name)) as f:
            write("fuzz-plan", name, f.read())
    write("fuzz-plan", "minimal.yaml", "name: web\ngroups:\n  - name: all\n    items:\n      - host: web\n        recovery-host: rec2\n")
    for name in ("agent.yaml", "controller.yaml"):
        with open(os.path.join(CONFIG, name)) as f:
            write("fuzz-config", name, f.read())
    write("fuzz-config", "flow.yaml", "{data-dir: /d, hooks: {quiesce: 'fsfreeze -f /'}, reconnect-max-delay: 10s, change-log-memory: 64M}\n")
    fingerprint = bytes(range(32))
    secret = bytes(range(100, 132))
    b64 = lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")
    write("fuzz-token", "token", f"ferry1.{b64(fingerprint)}.{b64(secret)}\n")
    write("fuzz-token", "token-short-secret", f"ferry1.{b64(fingerprint)}.{b64(secret[:17])}")


if __name__ == "__main__":
    main()
