"""Videos: listing sources (`sources`), the local media cache (`cache`), the one way to read a
video's frames by URI (`frames`; `frame_jobs` in the processes that read them ahead of a model), and probing and
cutting with ffmpeg (`ffmpeg`)."""
