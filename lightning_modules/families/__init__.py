"""One package per model family; each holds everything of its paper's mechanism in one place."""
