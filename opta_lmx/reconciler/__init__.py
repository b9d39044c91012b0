"""The control loop: observe -> plan -> act -> write status. Imports state and engine."""
