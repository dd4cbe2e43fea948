"""Videos: listing sources (`sources`), the local media cache (`cache`), the one way to read a
video's frames by URI (`frames`), and probing and cutting with ffmpeg (`ffmpeg`)."""
