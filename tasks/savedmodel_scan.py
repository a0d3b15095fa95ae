"""Refuse a SavedModel that could touch files, run Python or talk to the network, before TensorFlow loads it.

A SavedModel is a program: its graph runs on our workers at every forward
pass (training, the serving check, champion re-scoring, TFLite conversion) and
in any serving system. A graph that does `write_file(x, read_file(secret))`
needs no Python to do harm. `check_saved_model` parses `saved_model.pb` as the
SavedModel proto (nothing is loaded or run), walks the graph and every
function of its library, and refuses it when any node is an op of
`FORBIDDEN_OPS` or an op this TensorFlow does not know (a custom op from a
shared library).

The one exception is the checkpoint machinery every TF2 SavedModel carries:
SaveV2, RestoreV2 and MergeV2Checkpoints are allowed in the functions that
only the SavedModel's saver reaches (`__inference__traced_save/restore…`), and
nowhere else.
"""
from __future__ import annotations

from pathlib import Path

from tasks.errors import BackboneError

# Derived from TensorFlow 2.21's op registry: every op that reads, writes or lists files (readers, file datasets,
# summaries, debug dumps, lookup tables from text files, proto descriptors from files, memory-mapped constants),
# runs Python, or talks to other processes (RPC, data service, collectives, send/recv).
FILE_OPS = frozenset({
    "ReadFile", "WriteFile", "MatchingFiles", "MatchingFilesDataset", "ExperimentalMatchingFilesDataset",
    "ImmutableConst", "FileSystemSetConfiguration", "PrintV2",
    "InitializeTableFromTextFile", "InitializeTableFromTextFileV2", "GenerateVocabRemapping", "LoadAndRemapMatrix",
    "DecodeProtoV2", "EncodeProto",
    "Save", "SaveSlices", "Restore", "RestoreSlice", "DTensorRestoreV2", "CalibrationStatisticsSaver",
    "TFRecordReader", "TFRecordReaderV2", "WholeFileReader", "WholeFileReaderV2", "FixedLengthRecordReader",
    "FixedLengthRecordReaderV2", "TextLineReader", "TextLineReaderV2", "IdentityReader", "IdentityReaderV2",
    "LMDBReader", "ReaderRead", "ReaderReadV2", "ReaderReadUpTo", "ReaderReadUpToV2", "ReaderRestoreState",
    "ReaderRestoreStateV2", "ReaderSerializeState", "ReaderSerializeStateV2", "ReaderReset", "ReaderResetV2",
    "ReaderNumRecordsProduced", "ReaderNumRecordsProducedV2", "ReaderNumWorkUnitsCompleted",
    "ReaderNumWorkUnitsCompletedV2", "RecordInput",
    "TFRecordDataset", "TFRecordDatasetV2", "TextLineDataset", "FixedLengthRecordDataset",
    "FixedLengthRecordDatasetV2", "CSVDataset", "CSVDatasetV2", "ExperimentalCSVDataset", "LMDBDataset",
    "ExperimentalLMDBDataset", "SqlDataset", "ExperimentalSqlDataset", "CacheDataset", "CacheDatasetV2",
    "SnapshotDataset", "SnapshotDatasetV2", "SnapshotDatasetReader", "SnapshotNestedDatasetReader",
    "SnapshotChunkDataset", "ListSnapshotChunksDataset", "SaveDataset", "SaveDatasetV2", "LoadDataset",
    "DistributedSave", "DatasetToTFRecord", "ExperimentalDatasetToTFRecord",
    "SummaryWriter", "CreateSummaryFileWriter", "CreateSummaryDbWriter", "WriteSummary", "WriteScalarSummary",
    "WriteImageSummary", "WriteAudioSummary", "WriteHistogramSummary", "WriteGraphSummary", "WriteRawProtoSummary",
    "FlushSummaryWriter", "CloseSummaryWriter", "ImportEvent", "StatsAggregatorSetSummaryWriter",
    "DebugIdentity", "DebugIdentityV2", "DebugIdentityV3", "DebugNanCount", "DebugNumericSummary",
    "DebugNumericSummaryV2", "DebugGradientIdentity", "DebugGradientRefIdentity", "Copy", "CopyHost",
})
PYTHON_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc", "GeneratorDataset"})
PROCESS_OPS = frozenset({
    "RpcCall", "RpcCheckStatus", "RpcClient", "RpcGetValue", "RpcServer", "RpcServerRegister", "RpcServerStart",
    "DeleteRpcFutureResource", "DataServiceDataset", "DataServiceDatasetV2", "DataServiceDatasetV3",
    "DataServiceDatasetV4", "RegisterDataset", "RegisterDatasetV2",
    "Send", "Recv", "_Send", "_Recv", "_HostSend", "_HostRecv",
    "CollectiveAllToAllV2", "CollectiveAllToAllV3", "CollectiveAssignGroupV2", "CollectiveBcastRecv",
    "CollectiveBcastRecvV2", "CollectiveBcastSend", "CollectiveBcastSendV2", "CollectiveGather",
    "CollectiveGatherV2", "CollectiveInitializeCommunicator", "CollectivePermute", "CollectiveReduce",
    "CollectiveReduceScatterV2", "CollectiveReduceV2", "CollectiveReduceV3",
})
FORBIDDEN_OPS = FILE_OPS | PYTHON_OPS | PROCESS_OPS
CHECKPOINT_OPS = frozenset({"SaveV2", "RestoreV2", "MergeV2Checkpoints"})


def check_saved_model(path: str | Path, what: str = "SavedModel") -> None:
    """Raise BackboneError naming the ops when the SavedModel in `path` may touch files, Python or processes."""
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.framework import op_def_registry

    path = Path(path)
    saved = saved_model_pb2.SavedModel()
    binary, text = path / "saved_model.pb", path / "saved_model.pbtxt"
    try:
        if binary.is_file():
            saved.ParseFromString(binary.read_bytes())
        elif text.is_file():
            from google.protobuf import text_format

            text_format.Parse(text.read_text(), saved)
        else:
            raise BackboneError(f"{what}: no saved_model.pb in {path}; give a TF2 SavedModel directory")
    except (ValueError, UnicodeDecodeError) as error:  # protobuf's DecodeError and ParseError are ValueErrors
        raise BackboneError(f"{what}: {path} holds no readable SavedModel proto ({str(error)[:200]})") from error
    found: dict[str, set[str]] = {}
    for meta_graph in saved.meta_graphs:
        for op, where in _forbidden(meta_graph, op_def_registry.get):
            found.setdefault(op, set()).add(where)
    if found:
        listed = "; ".join(f"{op} in {', '.join(sorted(places)[:3])}" for op, places in sorted(found.items()))
        raise BackboneError(f"{what} is refused: its graph uses ops that read or write files, run Python, reach "
                            f"other processes or are unknown to this TensorFlow ({listed}); nothing was loaded. A "
                            "model must be a plain computation: export it again without them")


def _forbidden(meta_graph, registered) -> list[tuple[str, str]]:
    """(op, where) for every node of the graph or its library that may not run here."""
    library = {function.signature.name: function for function in meta_graph.graph_def.library.function}
    graph_nodes = {node.name: node for node in meta_graph.graph_def.node}
    saver_nodes = _saver_closure(meta_graph, graph_nodes)
    saver_reach = _reachable(_called(graph_nodes[name] for name in saver_nodes), library)
    roots = set(_called(node for name, node in graph_nodes.items() if name not in saver_nodes))
    roots |= {name for name in meta_graph.object_graph_def.concrete_functions}
    roots |= {gradient.gradient_func for gradient in meta_graph.graph_def.library.gradient}
    roots |= set(library) - saver_reach
    saver_only = saver_reach - _reachable(roots, library)

    def refused(op: str, checkpoint_allowed: bool) -> bool:
        if op in FORBIDDEN_OPS or (op in CHECKPOINT_OPS and not checkpoint_allowed):
            return True
        return op not in library and op not in CHECKPOINT_OPS and registered(op) is None

    found = [(node.op, "the graph") for name, node in graph_nodes.items()
             if refused(node.op, name in saver_nodes)]
    for name, function in library.items():
        found += [(node.op, f"function {name}") for node in function.node_def
                  if refused(node.op, name in saver_only)]
    return found


def _saver_closure(meta_graph, graph_nodes: dict) -> set[str]:
    """Names of the graph nodes the saver's save and restore ops are computed from."""
    saver = meta_graph.saver_def
    pending = [name.split(":")[0] for name in (saver.save_tensor_name, saver.restore_op_name) if name]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen or name not in graph_nodes:
            continue
        seen.add(name)
        pending += [source.lstrip("^").split(":")[0] for source in graph_nodes[name].input]
    return seen


def _called(nodes) -> list[str]:
    """Names of the functions the nodes call: as their op, or in a function-valued attribute."""
    names = []
    for node in nodes:
        names.append(node.op)
        for value in node.attr.values():
            names += _attr_functions(value)
    return names


def _attr_functions(value) -> list[str]:
    names = []
    if value.HasField("func"):
        names.append(value.func.name)
        for inner in value.func.attr.values():
            names += _attr_functions(inner)
    for func in value.list.func:
        names.append(func.name)
        for inner in func.attr.values():
            names += _attr_functions(inner)
    return names


def _reachable(roots, library: dict) -> set[str]:
    """The library functions reachable from `roots` through calls."""
    seen: set[str] = set()
    pending = [name for name in roots if name in library]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        pending += [called for called in _called(library[name].node_def) if called in library]
    return seen
