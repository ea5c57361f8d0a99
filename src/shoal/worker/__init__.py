"""The worker role: node profile gathering now; planning, runner supervision and downloads later."""
