"""Rewards: functions with TRL's signature, reward models (`scoring`), and verifiers for math answers."""
