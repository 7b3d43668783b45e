/* The cluster link over MPI (ctrl/link.h): every member a rank of one mpirun job, member id =
 * rank in comm (the coordinator is rank 0). One failure domain: a dead rank ends the job, so this
 * transport never raises MOE_LINK_LOST and cannot fence. */
#ifndef MOE_CTRL_LINK_MPI_H
#define MOE_CTRL_LINK_MPI_H

#include <mpi.h>

#include "ctrl/link.h"

/* comm is borrowed (it must outlive the link); messages use its point-to-point tags. */
moe_status moe_link_mpi_create(MPI_Comm comm, moe_link **out);

#endif
