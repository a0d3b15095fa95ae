"""Split files read back: `only` some records, and the reference sample publish embeds from them."""
from __future__ import annotations

import numpy as np

from tasks import embedding_reference, images, records
from tests.helpers.runs import examples

SIZE = 16


def test_only_the_given_records_come_back_in_file_order(tmp_path):
    path = tmp_path / "train.tfrecord"
    written = examples(per_class=4, seed=0)
    records.write_records(path, written)
    wanted = [9, 2, 2, 11, 0]  # unsorted and repeated: each record once, in file order
    batches = list(records.image_dataset(path, SIZE, 2, with_paths=True, only=wanted))
    paths = [name.decode() for _, _, names in batches for name in names.numpy()]
    assert paths == [written[index][2] for index in (0, 2, 9, 11)]
    labels = np.concatenate([labels.numpy() for _, labels, _ in batches])
    assert labels.tolist() == [written[index][1] for index in (0, 2, 9, 11)]
    pixels = np.concatenate([batch.numpy() for batch, _, _ in batches])
    np.testing.assert_array_equal(pixels[2], images.decode(written[9][0], SIZE))
    assert list(records.image_dataset(path, SIZE, 2, only=[])) == []


def test_the_reference_sample_embeds_the_sampled_records_in_file_order(tmp_path):
    import keras

    path = tmp_path / "train.tfrecord"
    written = examples(per_class=400, seed=1)  # more records than the sample keeps
    records.write_records(path, written)
    inputs = keras.Input((SIZE, SIZE, 3))
    hidden = keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))

    meta = embedding_reference.write(model, path, tmp_path, seed=3)

    chosen = embedding_reference.sample_indices(len(written), seed=3)
    assert len(chosen) == embedding_reference.MAX_ROWS < len(written)
    assert meta["n_rows"] == len(chosen) and meta["n_records"] == len(written) and meta["embedding_size"] == 5
    stored = embedding_reference.load(tmp_path / embedding_reference.FILE)
    expected = keras.Model(inputs, hidden)(np.stack([images.decode(written[index][0], SIZE) for index in chosen]))
    np.testing.assert_allclose(stored, np.asarray(expected).astype(embedding_reference.DTYPE), rtol=1e-3, atol=1e-3)
