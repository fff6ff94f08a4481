"""The peer: file server (GET_FILE, FETCH) and downloader."""
