/** nbdmig's version: the agent API reports it and the CLI prints it. */
export const VERSION = "0.1.0";
