"""What the tests share: data, trainers, subprocess launches. Tests import these, never each other."""
