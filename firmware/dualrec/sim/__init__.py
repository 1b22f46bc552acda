"""The simulated counter: camera, microphone, panel and a teller terminal process."""
