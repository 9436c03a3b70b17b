"""benchmark_data.py in a fresh clone: the photos it needs are fetched, or it says what to do."""
import pytest

import benchmark_data


def fake_fetcher(tmp_path, body):
    script = tmp_path / 'fetch.sh'
    script.write_text(body)
    return str(script)


def test_photos_present_are_used_as_they_are(photo_paths, monkeypatch):
    monkeypatch.setattr(benchmark_data, 'FETCH_PHOTOS', '/nonexistent/fetch.sh')
    folder = str(photo_paths[0].parent)
    assert benchmark_data.photos_in(folder) == folder


def test_an_empty_folder_is_filled_by_the_fetch_script(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark_data, 'FETCH_PHOTOS', fake_fetcher(tmp_path, 'mkdir -p "$1" && touch "$1/dog.jpg"\n'))
    folder = str(tmp_path / 'photos')
    assert benchmark_data.photos_in(folder) == folder


def test_photos_that_cannot_be_had_end_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark_data, 'FETCH_PHOTOS', fake_fetcher(tmp_path, 'exit 1\n'))
    with pytest.raises(SystemExit, match=r'no JPEG photos in .*photos; give -photos DIR'):
        benchmark_data.photos_in(str(tmp_path / 'photos'))


def test_shared_memory_per_batch_is_a_quarter_of_float32s(photo_paths, tmp_path):
    """Batch 256 at 224 px: uint8 images, int64 labels and one erase box each (36.8 MiB) against float32 images
    and labels (147 MiB, over Docker's default 64 MB /dev/shm)."""
    (tmp_path / 'train_list.txt').write_text(''.join(f'{path} 0\n' for path in photo_paths))
    config = benchmark_data.get_config()
    config.DATA.DATA_PATH, config.DATA.BATCH_SIZE = str(tmp_path), 256
    uint8_bytes, float32_bytes = benchmark_data.shared_memory_per_batch(config)
    assert uint8_bytes == 256 * (3 * 224 * 224 + 8 + 5 * 8)
    assert float32_bytes == 256 * (4 * 3 * 224 * 224 + 8) > 64 * 10 ** 6
