"The step engine: trace callbacks into a program (`trace`), emit and compile kernels (`cpu`), keep state in its dtypes (`storage`), plan and run buckets (`plan`)"
