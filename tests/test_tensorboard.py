"""TensorBoard event files: the checksum against the published CRC-32C test vectors, and the
files decoded by protobuf's own parser (the messages described here from TensorBoard's
.proto fields), not by the writer's code."""
import struct

import pytest
from typer.testing import CliRunner

from rnndsl.cli import app
from rnndsl.language.errors import UserError
from rnndsl.training.tensorboard import EventWriter, crc32c, masked_crc32c

descriptor_pb2 = pytest.importorskip("google.protobuf.descriptor_pb2")
message_factory = pytest.importorskip("google.protobuf.message_factory")
descriptor_pool = pytest.importorskip("google.protobuf.descriptor_pool")


def test_crc32c_matches_the_published_check_values():
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283  # the CRC catalogue's check value for CRC-32C
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720, B.4: 32 bytes of zeros
    assert crc32c(b"\xff" * 32) == 0x62A8AB43  # RFC 3720, B.4: 32 bytes of ones
    assert crc32c(bytes(range(32))) == 0x46DD794E  # RFC 3720, B.4: incrementing


def _event_class():
    """Event, Summary and Value of TensorBoard's event.proto / summary.proto: the fields that
    scalars use, with their numbers and types."""
    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="rnndsl_test_event.proto", package="tb")
    value = file.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=f.TYPE_FLOAT, label=f.LABEL_OPTIONAL)
    summary = file.message_type.add(name="Summary")
    summary.field.add(name="value", number=1, type=f.TYPE_MESSAGE, label=f.LABEL_REPEATED,
                      type_name=".tb.Value")
    event = file.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=f.TYPE_DOUBLE, label=f.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=f.TYPE_INT64, label=f.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    event.field.add(name="summary", number=5, type=f.TYPE_MESSAGE, label=f.LABEL_OPTIONAL,
                    type_name=".tb.Summary")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tb.Event"))


def read_events(path):
    """The events of a file, each record's framing and checksums checked."""
    Event, data, events = _event_class(), path.read_bytes(), []
    while data:
        header, length_crc = data[:8], struct.unpack("<I", data[8:12])[0]
        assert length_crc == masked_crc32c(header)
        (n,) = struct.unpack("<Q", header)
        payload, payload_crc = data[12:12 + n], struct.unpack("<I", data[12 + n:16 + n])[0]
        assert payload_crc == masked_crc32c(payload)
        events.append(Event.FromString(payload))
        data = data[16 + n:]
    return events


def test_scalars_are_read_back_by_protobuf(tmp_path):
    with EventWriter(tmp_path / "run") as writer:
        writer.scalars(10, {"loss": 0.5, "accuracy": 0.25})
        writer.scalars(2**40, {"loss": -3.0})
    (path,) = (tmp_path / "run").iterdir()
    assert "tfevents" in path.name
    first, second, third = read_events(path)
    assert first.file_version == "brain.Event:2"
    assert second.step == 10 and second.wall_time > 1.6e9
    assert {v.tag: v.simple_value for v in second.summary.value} == {"loss": 0.5,
                                                                      "accuracy": 0.25}
    assert third.step == 2**40 and third.summary.value[0].simple_value == -3.0


def test_an_unwritable_log_folder_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write TensorBoard logs"):
        EventWriter(tmp_path / "file" / "run")


def test_train_and_compare_log_each_run(tmp_path):
    logs = tmp_path / "logs"
    result = CliRunner().invoke(app, ["compare", "elman", "mgu", "--task", "adding", "--length",
                                      "6", "--hidden", "4", "--steps", "60", "--batch", "4",
                                      "--tensorboard", str(logs)])
    assert result.exit_code == 0, result.output
    runs = sorted(p.name for p in logs.iterdir())
    assert runs == ["0-elman", "1-mgu"]
    for run in runs:
        (path,) = (logs / run).iterdir()
        events = read_events(path)[1:]
        assert [e.step for e in events] == [50, 60]  # every log_every steps, and the last
        tags = {v.tag for v in events[0].summary.value}
        assert {"loss", "grad_norm", "steps_per_s"} <= tags
