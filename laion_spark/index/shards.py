"""What Spark tasks do for the index: build a shard from the trained empty index, rewrite a shard without some ids,
stage the training sample.

Runs in Python workers (mapInArrow / applyInPandas): faiss, numpy and pyarrow, a batch at a time, no pyspark
import but TaskContext. Files go through :class:`~laion_spark.storage.outputs.OutputDir`, so a task writes to the
index directory by URI (local, object store) and every file appears whole or not at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from laion_spark.index.layout import METADATA_COLUMNS, MODALITIES, Shard
from laion_spark.index.train import add_vectors
from laion_spark.storage.outputs import OutputDir

# The embeddings' columns, by modality, in the rows the tasks receive.
VECTOR_COLUMNS = {"image": "image_embedding", "text": "text_embedding"}
# Or, instead of the vectors, where they lie (VectorFiles): the parquet file (Spark's _metadata.file_path) and the
# row's key there.
VECTOR_FILE = "_vector_file"
VECTOR_KEY = "_vector_key"
# One row back to the driver per shard built: all it needs to write the manifest.
BUILT_SCHEMA = "number int, shard string, count long, duplicates long"
# One row back per shard rewritten without some ids; new is "" when no vector was left.
REWRITTEN_SCHEMA = "old string, new string, count long, removed long"
# One row back per task that staged part of the training sample.
SAMPLED_SCHEMA = "part int, rows long"


def metadata_schema() -> pa.Schema:
    return pa.schema([(name, pa.type_for_alias(type_name)) for name, type_name in METADATA_COLUMNS])


def vectors_from_arrow(column: pa.Array | pa.ChunkedArray, d: int, what: str = "embedding") -> np.ndarray:
    """A list<float> (or fixed_size_list) column as an (n, d) float32 matrix, through the list's flat values buffer
    (no Python object per row)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise ValueError(f"{column.null_count} row(s) have no {what}")
    if pa.types.is_fixed_size_list(column.type):
        if len(column) and column.type.list_size != d:
            raise ValueError(f"{what} of dimension {column.type.list_size} where {d} was expected")
    else:
        lengths = np.diff(np.asarray(column.offsets))
        if len(lengths) and (lengths.min() != d or lengths.max() != d):
            raise ValueError(f"{what} of dimension {int(lengths.min())}..{int(lengths.max())} where {d} was expected")
    values = column.flatten()  # honours the slice's offset, unlike .values
    if values.type != pa.float32():
        values = values.cast(pa.float32())
    return np.ascontiguousarray(values.to_numpy(zero_copy_only=False).reshape(len(column), d))


@dataclass(frozen=True)
class VectorFiles:
    """Rows that locate their embeddings instead of carrying them: the parquet file (VECTOR_FILE) and the row's
    value of the files' ``key`` column (VECTOR_KEY), whose ``columns`` (modality -> the files' column; both may name
    one) the tasks read with pyarrow. Spark hands ``array<float>`` to a Python worker element by element: 13-17 s of
    a 2-core machine for 1M rows of two 512-float embeddings, where pyarrow decodes the same row groups in 2-3 s
    (bench/index.py). A key, not ``_metadata.row_index``: Delta exposes row numbers only on tables with deletion
    vectors."""

    columns: dict[str, str]
    key: str

    def physical_columns(self) -> list[str]:
        return sorted(set(self.columns.values()))


# Rows handed on at a time, once their vectors are read.
LOCATED_BATCH_ROWS = 8192


def with_vectors(batches: Iterator[pa.RecordBatch], files: VectorFiles | None) -> Iterator[pa.RecordBatch]:
    """``batches`` with the VECTOR_COLUMNS filled in: as they are when ``files`` is None. Else the task's rows (their
    small columns: all of them are held) are read file by file, in each file's row order, so that each row group
    is decoded once whatever order the rows came in; they come out in that order, with VECTOR_FILE and VECTOR_KEY
    dropped."""
    if files is None:
        yield from batches
        return
    received = [batch for batch in batches if batch.num_rows]
    if not received:
        return
    table = pa.Table.from_batches(received)
    kept = [name for name in table.schema.names if name not in (VECTOR_FILE, VECTOR_KEY, *VECTOR_COLUMNS.values())]
    paths = table.column(VECTOR_FILE).combine_chunks().dictionary_encode()
    codes = paths.indices.to_numpy(zero_copy_only=False)
    keys = table.column(VECTOR_KEY).combine_chunks()
    reader = _RowGroupReader(files)
    try:
        for code in np.unique(codes):
            rows = np.flatnonzero(codes == code)
            path = paths.dictionary[int(code)].as_py()
            positions = reader.positions(path, keys.take(pa.array(rows)))
            order = np.argsort(positions, kind="stable")
            rows, positions = rows[order], positions[order]
            for start in range(0, len(rows), LOCATED_BATCH_ROWS):
                chosen = rows[start : start + LOCATED_BATCH_ROWS]
                vectors = reader.take(path, positions[start : start + LOCATED_BATCH_ROWS])
                arrays = [table.column(name).take(pa.array(chosen)).combine_chunks() for name in kept]
                arrays += [vectors[modality] for modality in MODALITIES]
                yield pa.RecordBatch.from_arrays(arrays, names=[*kept, *(VECTOR_COLUMNS[m] for m in MODALITIES)])
    finally:
        reader.close()


class _RowGroupReader:
    """One task's reader of located vectors: the open file, its key column, and its last decoded row group."""

    def __init__(self, files: VectorFiles) -> None:
        self.files = files
        self.path: str | None = None
        self.handle = None
        self.file = None
        self.keys: pa.Array | None = None
        self.starts = np.zeros(1, dtype=np.int64)  # first row of each row group, then the file's row count
        self.group = -1
        self.table: pa.Table | None = None
        # The row group's columns as (rows, d) float32 matrices, where every row has a vector of one length: a row
        # is then picked by numpy indexing, not list by list.
        self.matrices: dict[str, np.ndarray] = {}

    def positions(self, path: str, keys: pa.Array) -> np.ndarray:
        """The rows of file ``path`` that hold ``keys`` (the file's key column is read once per file)."""
        import pyarrow.compute as pc

        self._open(path)
        if keys.type != self.keys.type:
            keys = keys.cast(self.keys.type)
        found = pc.index_in(keys, value_set=self.keys)
        if found.null_count:
            missing = keys.filter(found.is_null())[0].as_py()
            raise ValueError(
                f"{path} has no row whose {self.files.key} is {missing!r} ({found.null_count} such): the file changed "
                "after the rows were planned"
            )
        return found.to_numpy(zero_copy_only=False).astype(np.int64)

    def take(self, path: str, rows: np.ndarray) -> dict[str, pa.Array]:
        """The vectors of ``rows`` (row numbers in the file, ascending for speed) of file ``path``, by modality, as
        fixed_size_list<float> arrays."""
        self._open(path)
        groups = np.searchsorted(self.starts, rows, side="right") - 1
        bounds = [0, *(np.flatnonzero(groups[1:] != groups[:-1]) + 1).tolist(), len(rows)]
        taken: dict[str, list[pa.Array]] = {modality: [] for modality in MODALITIES}
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            group = int(groups[start])
            table = self._row_group(group)
            local = rows[start:end] - self.starts[group]
            by_column = {name: self._take(table, name, local) for name in self.files.physical_columns()}
            for modality, column in self.files.columns.items():
                taken[modality].append(by_column[column])
        return {modality: pa.concat_arrays(arrays) for modality, arrays in taken.items()}

    def _open(self, path: str) -> None:
        if path == self.path:
            return
        import pyarrow.parquet as pq

        self.close()
        filesystem, inner = resolve_file_uri(path)
        self.handle = filesystem.open_input_file(inner)
        self.file = pq.ParquetFile(self.handle)
        wanted = [*self.files.physical_columns(), self.files.key]
        missing = [c for c in wanted if c not in self.file.schema_arrow.names]
        if missing:
            raise ValueError(f"{path} has no column {', '.join(missing)}: it is not a file of the embeddings")
        metadata = self.file.metadata
        sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self.keys = self.file.read(columns=[self.files.key], use_threads=False).column(0).combine_chunks()
        self.path = path

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        self.path, self.handle, self.file, self.keys = None, None, None, None
        self.group, self.table, self.matrices = -1, None, {}

    def _row_group(self, group: int) -> pa.Table:
        if group != self.group:
            self.table, self.matrices = None, {}  # the previous one is let go before the next is decoded
            self.table = self.file.read_row_group(group, columns=self.files.physical_columns(), use_threads=False)
            self.group = group
            for name in self.files.physical_columns():
                column = self.table.column(name).combine_chunks()
                if column.null_count == 0 and _uniform_length(column):
                    self.matrices[name] = _matrix(column)
        return self.table

    def _take(self, table: pa.Table, name: str, local: np.ndarray) -> pa.Array:
        matrix = self.matrices.get(name)
        if matrix is not None:
            chosen = matrix[local]
        else:  # the row group has rows without a vector, or vectors of several lengths: the asked rows must not
            lists = table.column(name).take(pa.array(local)).combine_chunks()
            if lists.null_count:
                raise ValueError(f"{lists.null_count} row(s) of {self.path} have no {name}")
            if not _uniform_length(lists):
                raise ValueError(f"rows of {self.path} have {name} vectors of different lengths")
            chosen = _matrix(lists)
        return pa.FixedSizeListArray.from_arrays(pa.array(chosen.reshape(-1)), chosen.shape[1])


def _uniform_length(lists: pa.Array) -> bool:
    lengths = np.diff(np.asarray(lists.offsets))
    return len(lengths) == 0 or lengths.min() == lengths.max()


def _matrix(lists: pa.Array) -> np.ndarray:
    """A list array without nulls, all of one length, as a (rows, length) float32 matrix."""
    width = int(np.asarray(lists.offsets)[1] - np.asarray(lists.offsets)[0]) if len(lists) else 0
    return vectors_from_arrow(lists, width)


def resolve_file_uri(uri: str) -> tuple[object, str]:
    """(pyarrow filesystem, path) of a file as Spark names it in ``_metadata.file_path``: a URI, percent-encoded,
    ``file:/x`` for a local file."""
    from urllib.parse import unquote

    from laion_spark.storage.outputs import resolve

    if uri.startswith("file:"):
        path = uri[len("file:") :]
        if path.startswith("//"):  # file:///x, or file://host/x with an empty or local host
            path = "/" + path[2:].partition("/")[2]
        return resolve(unquote(path))
    return resolve(uri)


def limit_threads() -> int:
    """One faiss (OpenMP) thread per core Spark gave the task (spark.task.cpus), so that concurrent tasks on an
    executor do not oversubscribe it; outside a task, faiss's default. Returns the thread count."""
    import faiss

    try:
        from pyspark import TaskContext

        context = TaskContext.get()
    except ImportError:
        context = None
    if context is None:
        return faiss.omp_get_max_threads()
    cpus = max(1, int(context.cpus() or 1))
    faiss.omp_set_num_threads(cpus)
    return cpus


def write_index(directory: OutputDir, path: str, index) -> None:
    """Stream a faiss index into ``path`` (atomically), without a second in-memory copy of it."""
    import faiss

    def write(stream) -> None:
        writer = faiss.PyCallbackIOWriter(stream.write)
        faiss.write_index(index, writer)
        del writer  # flushes its buffer into the stream

    directory.publish(path, write)


def read_index(directory: OutputDir, path: str):
    import faiss

    with directory.filesystem.open_input_stream(directory.path(path)) as stream:
        return faiss.read_index(faiss.PyCallbackIOReader(stream.read))


def write_metadata(directory: OutputDir, path: str, table: pa.Table) -> None:
    import pyarrow.parquet as pq

    directory.publish(path, lambda stream: pq.write_table(table, stream))


def read_metadata(directory: OutputDir, path: str) -> pa.Table:
    import pyarrow.parquet as pq

    with directory.filesystem.open_input_file(directory.path(path)) as stream:
        return pq.read_table(stream)


def metadata_of(batch: pa.RecordBatch, keep: np.ndarray | None = None) -> pa.Table:
    """The metadata columns of ``batch`` (those it lacks are null), in the layout's types."""
    schema = metadata_schema()
    columns = []
    for column_field in schema:
        if column_field.name in batch.schema.names:
            column = batch.column(column_field.name)
            columns.append(column if column.type == column_field.type else column.cast(column_field.type))
        else:
            columns.append(pa.nulls(batch.num_rows, column_field.type))
    table = pa.Table.from_arrays(columns, schema=schema)
    return table if keep is None else table.filter(pa.array(keep))


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:05d}"


@dataclass(frozen=True)
class ShardBuilder:
    """mapInArrow function: the rows of one partition become one shard, or several of ``max_rows`` vectors at
    most when the partition holds more (the input had fewer partitions than shards, and coalescing cannot split
    one). The ``piece``-th shard of partition ``p`` is numbered ``first_number + p + piece * partitions``: unique
    across the tasks, and ``first_number + p`` (consecutive numbers) whenever no partition is cut.

    An id seen twice in the partition (two pairs whose uids share their first 63 bits) is kept once, its first row,
    and counted; the caller brings every row of such an id into one partition (laion_spark.index.build.add_shards).
    """

    directory: OutputDir
    trained: dict[str, bytes]  # modality -> faiss.serialize_index of the trained, empty index
    d: int
    prefix: str
    first_number: int
    max_rows: int
    partitions: int  # of the DataFrame the builder maps: the stride between one partition's shard numbers
    files: VectorFiles | None = None  # where the rows' vectors lie, when they do not carry them

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        limit_threads()
        batches = with_vectors(batches, self.files)
        context = TaskContext.get()
        partition = context.partitionId() if context is not None else 0
        piece: _ShardPiece | None = None
        pieces = 0
        seen: set[int] = set()
        duplicates = 0
        for batch in batches:
            if batch.num_rows == 0:
                continue
            ids = batch.column("id").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
            keep = _first_occurrences(ids, seen)
            duplicates += len(ids) - int(keep.sum())
            if not keep.all():
                batch, ids = batch.filter(pa.array(keep)), ids[keep]
            start = 0
            while start < batch.num_rows:
                if piece is None:
                    number = self.first_number + partition + pieces * self.partitions
                    piece = _ShardPiece(shard_name(self.prefix, number), number, self._empty_indexes())
                    pieces += 1
                take = min(batch.num_rows - start, self.max_rows - piece.count)
                piece.add(batch.slice(start, take), ids[start : start + take], self.d)
                start += take
                if piece.count >= self.max_rows:
                    # Written as soon as it is full: a task holds one shard's index at a time.
                    yield piece.write(self.directory, duplicates)
                    piece, duplicates = None, 0
        if piece is not None:
            yield piece.write(self.directory, duplicates)
        elif duplicates:  # the last shard filled up before the last rows, all duplicates, came
            yield _built_row(-1, "", 0, duplicates)

    def _empty_indexes(self) -> dict:
        import faiss

        return {m: faiss.deserialize_index(np.frombuffer(self.trained[m], dtype=np.uint8)) for m in MODALITIES}


@dataclass
class _ShardPiece:
    """One shard being filled by a task: its two indexes and its metadata, batch by batch."""

    name: str
    number: int
    indexes: dict
    metadata: list[pa.Table] = field(default_factory=list)
    count: int = 0

    def add(self, batch: pa.RecordBatch, ids: np.ndarray, d: int) -> None:
        for modality in MODALITIES:
            vectors = vectors_from_arrow(batch.column(VECTOR_COLUMNS[modality]), d, f"{modality} embedding")
            add_vectors(self.indexes[modality], vectors, ids)
        self.metadata.append(metadata_of(batch))
        self.count += batch.num_rows

    def write(self, directory: OutputDir, duplicates: int) -> pa.RecordBatch:
        shard = Shard(self.name, int(self.indexes[MODALITIES[0]].ntotal))
        for modality in MODALITIES:
            write_index(directory, shard.path(modality), self.indexes[modality])
        table = pa.concat_tables(self.metadata).sort_by("id")
        write_metadata(directory, shard.metadata_path, table)
        return _built_row(self.number, self.name, shard.count, duplicates)


def _built_row(number: int, name: str, count: int, duplicates: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {"number": [number], "shard": [name], "count": [count], "duplicates": [duplicates]},
        schema=pa.schema(
            [("number", pa.int32()), ("shard", pa.string()), ("count", pa.int64()), ("duplicates", pa.int64())]
        ),
    )


@dataclass(frozen=True)
class SampleWriter:
    """mapInArrow function: stage this partition's rows of the training sample as Arrow IPC files in
    ``directory``/``name``, ``<modality>-<part>.arrow``, one per modality so that the driver reads one at a time.
    Arrow straight from the task: Spark's parquet writer took 15-20 s for a 200,000 x 2 x 512 sample on 2 cores
    (bench/index.py), this a second."""

    directory: OutputDir
    name: str
    files: VectorFiles | None = None  # where the rows' vectors lie, when they do not carry them

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        kept = [
            batch for batch in with_vectors(batches, self.files) if batch.num_rows
        ]  # a sampled fraction of one input partition
        if not kept:
            return
        context = TaskContext.get()
        part = context.partitionId() if context is not None else 0
        for modality, column in VECTOR_COLUMNS.items():
            table = pa.table({column: pa.chunked_array([batch.column(column) for batch in kept])})
            self.directory.publish(sample_part_path(self.name, modality, part), _ipc_writer(table))
        rows = sum(batch.num_rows for batch in kept)
        yield pa.RecordBatch.from_pydict(
            {"part": [part], "rows": [rows]}, schema=pa.schema([("part", pa.int32()), ("rows", pa.int64())])
        )


def sample_part_path(name: str, modality: str, part: int) -> str:
    return f"{name}/{modality}-{part:05d}.arrow"


def read_arrow(directory: OutputDir, path: str) -> pa.Table:
    with directory.filesystem.open_input_file(directory.path(path)) as stream:
        return pa.ipc.open_file(stream).read_all()


def _ipc_writer(table: pa.Table):
    def write(stream) -> None:
        with pa.ipc.new_file(stream, table.schema) as writer:
            writer.write_table(table)

    return write


def _first_occurrences(ids: np.ndarray, seen: set[int]) -> np.ndarray:
    keep = np.ones(len(ids), dtype=bool)
    if len(np.unique(ids)) == len(ids) and seen.isdisjoint(ids.tolist()):
        seen.update(ids.tolist())
        return keep
    for i, value in enumerate(ids.tolist()):
        if value in seen:
            keep[i] = False
        else:
            seen.add(value)
    return keep


def rewrite_shard(ids_to_remove: np.ndarray, old: Shard, new_name: str, directory: OutputDir) -> tuple[str, int, int]:
    """Write ``old`` without ``ids_to_remove`` as shard ``new_name`` (nothing when no vector is left); the old files
    stay, for readers of the current manifest. Returns (new name or "", vectors left, vectors removed)."""
    import pyarrow.compute as pc

    limit_threads()
    ids = np.ascontiguousarray(ids_to_remove, dtype=np.int64)
    indexes = {m: read_index(directory, old.path(m)) for m in MODALITIES}
    removed = {m: int(indexes[m].remove_ids(ids)) for m in MODALITIES}
    if len(set(removed.values())) != 1:
        raise RuntimeError(f"shard {old.name}: removed {removed} vectors from the image and text indexes")
    metadata = read_metadata(directory, old.metadata_path)
    metadata = metadata.filter(pc.invert(pc.is_in(metadata.column("id"), value_set=pa.array(ids))))
    left = int(indexes[MODALITIES[0]].ntotal)
    if left != metadata.num_rows:
        raise RuntimeError(f"shard {old.name}: {left} vectors but {metadata.num_rows} metadata rows after removal")
    if left == 0:
        return "", 0, removed[MODALITIES[0]]
    new = Shard(new_name, left)
    for modality in MODALITIES:
        write_index(directory, new.path(modality), indexes[modality])
    write_metadata(directory, new.metadata_path, metadata)
    return new_name, left, removed[MODALITIES[0]]
