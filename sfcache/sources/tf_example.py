"""tf.train.Example (TensorFlow's RLDS record message) without registering it in protobuf's default pool.

TensorFlow registers `tensorflow/core/example/feature.proto` in the process-wide descriptor pool,
and so does the `tfrecord` package under another file name: whichever is imported second fails
with "duplicate symbol 'tensorflow.BytesList'". The messages here live in a private pool, so
sfcache reads and writes the same wire format next to TensorFlow in one process.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["Example", "encode_example"]

_KINDS = {"byte": "bytes_list", "float": "float_list", "int": "int64_list"}


def _message_classes() -> dict[str, type]:
    """Build example.proto's Example / Features / Feature / *List messages in a pool of our own."""
    fd = descriptor_pb2.FileDescriptorProto(name="sfcache/tf_example.proto", package="tensorflow", syntax="proto3")
    types = descriptor_pb2.FieldDescriptorProto
    label, optional = types.LABEL_REPEATED, types.LABEL_OPTIONAL

    for name, kind in (
        ("BytesList", types.TYPE_BYTES),
        ("FloatList", types.TYPE_FLOAT),
        ("Int64List", types.TYPE_INT64),
    ):
        message = fd.message_type.add(name=name)
        field = message.field.add(name="value", number=1, label=label, type=kind)
        if kind != types.TYPE_BYTES:
            field.options.packed = True
    feature = fd.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (field_name, type_name) in enumerate(
        (("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")), start=1
    ):
        feature.field.add(
            name=field_name,
            number=number,
            label=optional,
            type=types.TYPE_MESSAGE,
            type_name=f".tensorflow.{type_name}",
            oneof_index=0,
        )
    features = fd.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=optional, type=types.TYPE_STRING)
    entry.field.add(name="value", number=2, label=optional, type=types.TYPE_MESSAGE, type_name=".tensorflow.Feature")
    features.field.add(
        name="feature", number=1, label=label, type=types.TYPE_MESSAGE, type_name=".tensorflow.Features.FeatureEntry"
    )
    example = fd.message_type.add(name="Example")
    example.field.add(
        name="features", number=1, label=optional, type=types.TYPE_MESSAGE, type_name=".tensorflow.Features"
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    # protobuf >= 4.21 has GetMessageClass; older ones (TensorFlow 2.15 allows 3.20) only the factory
    message_class = (
        getattr(message_factory, "GetMessageClass", None) or message_factory.MessageFactory(pool).GetPrototype
    )
    return {name: message_class(pool.FindMessageTypeByName(f"tensorflow.{name}")) for name in ("Example", "Feature")}


Example = _message_classes()["Example"]


def encode_example(features: dict[str, tuple[list, str]]) -> bytes:
    """Serialize {name: (values, "byte" | "float" | "int")} as a tf.train.Example, in the given key order."""
    example = Example()
    for name, (values, kind) in features.items():
        getattr(example.features.feature[name], _KINDS[kind]).value.extend(values)
    return example.SerializeToString()
