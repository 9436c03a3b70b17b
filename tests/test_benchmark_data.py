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
