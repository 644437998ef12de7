"""The lab: everything used to test and measure the engine, none of which the engine imports —
`data` (Fashion-MNIST, BBC News, MNIST 5k, task splits), `zoo` (model families), `training`,
`evaluation`, `experiment` (the demo protocol)."""
